"""Model loading, LoRA presets, decoder padding, fp32 adapters under bf16, exact reload of adapters."""

from __future__ import annotations

import pytest
import torch

from scalelora.config import LoraConfig, ModelConfig
from scalelora.errors import UserError
from scalelora.models import build_model, count_params, load_classifier, load_tokenizer

LABELS = ["neg", "pos"]


def lora_modules(model) -> set[str]:
    return {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("tiny_bert", {"query", "value"}),
        ("tiny_gpt2", {"c_attn"}),
        ("tiny_llama", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ],
)
def test_lora_presets_per_architecture(request, fixture, expected):
    model = build_model(ModelConfig(name=str(request.getfixturevalue(fixture))), LoraConfig(r=2), LABELS)
    assert lora_modules(model) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert any(("classifier" in n or "score" in n) and "modules_to_save" in n for n in trainable)


def test_distilbert_pre_classifier_is_trained_and_saved(tmp_path):
    from transformers import AutoModel, DistilBertConfig

    AutoModel.from_config(
        DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    ).save_pretrained(tmp_path)
    model = build_model(ModelConfig(name=str(tmp_path)), LoraConfig(r=2), LABELS)
    assert lora_modules(model) == {"q_lin", "v_lin"}
    assert set(model.peft_config["default"].modules_to_save) >= {"pre_classifier", "classifier"}


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("roberta", {"query", "value"}),
        ("mpnet", {"q", "v"}),
        ("qwen2", {"q_proj", "k_proj", "v_proj", "o_proj"}),
        ("mistral", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ],
)
def test_lora_presets_of_the_other_documented_architectures(kind, expected, tmp_path):
    """The presets docs/training.md lists for RoBERTa, MPNet, Qwen and Mistral, on tiny random models."""
    from transformers import AutoConfig, AutoModel

    size = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    extra = {"num_key_value_heads": 2, "pad_token_id": 0} if kind in ("qwen2", "mistral") else {}
    config = AutoConfig.for_model(kind, vocab_size=100, **size, **extra)
    AutoModel.from_config(config).save_pretrained(tmp_path)
    model = build_model(ModelConfig(name=str(tmp_path)), LoraConfig(r=2), LABELS)
    assert lora_modules(model) == expected


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_decoders_get_a_pad_token_and_batched_logits_match_single(request, fixture):
    path = str(request.getfixturevalue(fixture))
    tokenizer = load_tokenizer(ModelConfig(name=path))
    assert tokenizer.pad_token == tokenizer.eos_token is not None
    model, _ = load_classifier(ModelConfig(name=path), LABELS)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    model.eval()
    texts = ["a short one", "a much longer text that needs no padding at all here"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        batched = model(**batch).logits
        single = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_lora_weights_stay_fp32_on_a_bf16_base_under_autocast(tiny_bert):
    model = build_model(ModelConfig(name=str(tiny_bert), dtype="bfloat16"), LoraConfig(r=2), LABELS)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad and "embeddings" in n]
    assert frozen[0].dtype == torch.bfloat16
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(5, 100, (4, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(
            model(input_ids=ids).logits.float(), torch.tensor([0, 1, 0, 1])
        )
    loss.backward()
    optimizer.step()
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_saved_adapter_with_head_reloads_to_identical_logits(tiny_bert, tmp_path):
    from peft import PeftModel

    torch.manual_seed(1)
    model = build_model(ModelConfig(name=str(tiny_bert)), LoraConfig(r=4), LABELS)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # make LoRA B and the head non-trivial
                param.add_(torch.randn_like(param) * 0.5)
    model.eval()
    ids = torch.randint(5, 1000, (3, 10))
    before = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    base, _ = load_classifier(ModelConfig(name=str(tiny_bert)), LABELS)
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.equal(reloaded(input_ids=ids).logits, before)


def test_modes_count_parameters(tiny_bert):
    lora = count_params(build_model(ModelConfig(name=str(tiny_bert)), LoraConfig(r=2), LABELS))
    full = count_params(build_model(ModelConfig(name=str(tiny_bert), mode="full"), LoraConfig(), LABELS))
    head = count_params(build_model(ModelConfig(name=str(tiny_bert), mode="head_only"), LoraConfig(), LABELS))
    assert full.trainable == full.total
    assert head.trainable == 32 * 2 + 2  # the classifier only
    assert 0 < lora.trainable < full.total and lora.pct < 5


def test_train_head_false_freezes_the_head(tiny_bert):
    model = build_model(ModelConfig(name=str(tiny_bert), train_head=False), LoraConfig(r=2), LABELS)
    assert not any("classifier" in n for n, p in model.named_parameters() if p.requires_grad)


def test_a_classifier_with_other_labels_is_refused(tiny_bert, tmp_path):
    model, _ = load_classifier(ModelConfig(name=str(tiny_bert)), ["a", "b", "c"])
    model.save_pretrained(tmp_path)
    with pytest.raises(
        UserError, match=r"is a classifier for labels \['a', 'b', 'c'\], but the data has \['neg', 'pos'\]"
    ):
        load_classifier(ModelConfig(name=str(tmp_path)), LABELS)
    kept, new = load_classifier(ModelConfig(name=str(tmp_path)), ["a", "b", "c"])
    assert new == []  # its trained head is kept, not re-initialised
    torch.testing.assert_close(kept.classifier.weight, model.classifier.weight)


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match=r"model\.name=/no/such/model: not a local model folder"):
        load_classifier(ModelConfig(name="/no/such/model"), LABELS)


@pytest.mark.slow
def test_minilm_alias_is_the_real_22m_model():
    model, new = load_classifier(ModelConfig(name="minilm-l6"), LABELS)
    assert new == ["classifier"]
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_000_000
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
