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
    # not EOS, which this tokenizer adds to every text: the MiniLM vocabulary's unused [PAD]
    assert tokenizer.pad_token == "[PAD]" != tokenizer.eos_token
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


def test_trainable_weights_take_the_dtype_of_a_base_built_under_zero_init(tiny_bert):
    """A base built under deepspeed.zero.Init (its parameters carry `ds_id`) is in DeepSpeed's bf16, and
    DeepSpeed casts nothing of such a model: LoRA and the head must be bf16 too (DeepSpeed keeps their
    float32 masters). Stand-in for the 2-process run in test_deepspeed.py: `ds_id` set by hand."""
    from scalelora.models import finish_model, trainable_dtype

    cfg = ModelConfig(name=str(tiny_bert), dtype="bfloat16")
    base, new_modules = load_classifier(cfg, LABELS)
    for i, param in enumerate(base.parameters()):
        param.ds_id = i
    model = finish_model(base, new_modules, cfg, LoraConfig(r=2))
    assert trainable_dtype(model) == torch.bfloat16
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.bfloat16}
    assert trainable_dtype(torch.nn.Linear(2, 2)) == torch.float32


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


# --- MaskDropout: torch.rand masks kept as 1 byte (train.mask_dropout) ---------------------------------


def saved_by_backward(fn, x: torch.Tensor) -> list[torch.Tensor]:
    """The tensors autograd keeps for backward while `fn(x)` runs."""
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(x)
    return saved


def test_mask_dropout_drops_with_p_scales_and_keeps_a_one_byte_mask():
    from scalelora.models import MaskDropout

    torch.manual_seed(0)
    p = 0.3
    x = torch.ones(400, 500, requires_grad=True)
    layer = MaskDropout(p).train()
    y = layer(x)
    dropped = (y == 0).float().mean().item()
    # 200,000 draws: the standard error of the dropped share is 0.001
    assert abs(dropped - p) < 0.005
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    y.backward(torch.full_like(y, 2.0))
    torch.testing.assert_close(x.grad, 2.0 * y.detach())  # the same mask, the same scale
    saved = saved_by_backward(layer, x)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.bool, x.shape)]
    # what it replaces keeps a 4-byte float mask
    assert [t.dtype for t in saved_by_backward(torch.nn.Dropout(p).train(), x)] == [torch.float32]


def test_mask_dropout_under_bf16_keeps_p_the_dtype_and_a_one_byte_mask():
    from scalelora.models import MaskDropout

    p = 0.1
    layer = MaskDropout(p).train()
    torch.manual_seed(0)
    x = torch.ones(400, 500, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    torch.manual_seed(0)
    y32 = layer(torch.ones(400, 500))
    # the mask does not depend on x's dtype: a bf16 draw (torch.rand in bf16 < p) rounds p to 1/256ths,
    # 0.1 -> 0.1016, which the drop rate alone (below) cannot tell from 0.1
    dropped, dropped32 = (y == 0).float().mean().item(), (y32 == 0).float().mean().item()
    assert torch.equal(y == 0, y32 == 0), f"bf16 and float32 masks differ (drop rates {dropped}, {dropped32})"
    assert abs(dropped - p) < 0.005
    # bf16 in, bf16 out, kept elements scaled by 1/(1-p) rounded once to bf16 (1.109375)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    y.backward(torch.full_like(y, 2.0))
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, 2.0 * y.detach(), rtol=0, atol=0)  # the same mask, the same scale
    saved = saved_by_backward(layer, x.detach().requires_grad_())
    assert [(t.dtype, t.shape) for t in saved] == [(torch.bool, x.shape)]  # not a 2-byte bf16 mask


def test_keep_mask_uses_every_lane_of_its_random_draws():
    from scalelora.models import keep_mask

    torch.manual_seed(0)
    keep = keep_mask(torch.Size([1001, 997]), 0.25)  # not a multiple of 4: the last draw is cut
    assert keep.dtype == torch.bool and keep.shape == (1001, 997)
    lanes = (~keep).flatten()[: 1001 * 996].view(-1, 4).float().mean(0)
    # each 64-bit draw gives four elements; a draw with a fixed sign bit would leave one lane never dropped
    torch.testing.assert_close(lanes, torch.full((4,), 0.25), atol=0.004, rtol=0)
    assert keep_mask(torch.Size([3]), 0.0).all()


def test_mask_dropout_is_nn_dropout_in_eval_at_p0_and_with_a_seed():
    from scalelora.models import MaskDropout

    x = torch.randn(8, 16)
    assert torch.equal(MaskDropout(0.5).eval()(x), x)
    assert torch.equal(MaskDropout(0.0).train()(x), x)
    torch.manual_seed(3)
    first = MaskDropout(0.5).train()(x)
    torch.manual_seed(3)
    assert torch.equal(MaskDropout(0.5).train()(x), first)


def test_use_mask_dropout_swaps_the_base_and_lora_dropouts(tiny_bert):
    from torch import nn

    from scalelora.models import MaskDropout, use_mask_dropout

    model = build_model(ModelConfig(name=str(tiny_bert)), LoraConfig(r=2, dropout=0.2), LABELS)
    keys = set(model.state_dict())
    before = [name for name, m in model.named_modules() if type(m) is nn.Dropout]
    assert any("lora_dropout" in name for name in before) and any("attention" in name for name in before)
    assert use_mask_dropout(model) == len(before)
    after = {name: m for name, m in model.named_modules() if isinstance(m, nn.Dropout)}
    assert sorted(after) == sorted(before)
    assert all(type(m) is MaskDropout for m in after.values())
    assert {m.p for name, m in after.items() if "lora_dropout" in name} == {0.2}
    assert set(model.state_dict()) == keys  # adapters save and load as before


def test_the_pad_token_of_a_decoder_avoids_every_role_and_falls_back_to_eos():
    from scalelora.models import unused_special_token

    class Stub:
        """A tokenizer with the attributes unused_special_token reads."""

        def __init__(self, specials: dict[int, str], **roles: int) -> None:
            from tokenizers import AddedToken

            self.added_tokens_decoder = {i: AddedToken(t, special=True) for i, t in specials.items()}
            for role in ("bos", "eos", "unk", "sep", "cls", "mask"):
                setattr(self, f"{role}_token_id", roles.get(role))
            self.adds = roles.get("adds", [])

        def __call__(self, text: str) -> dict[str, list[int]]:
            return {"input_ids": [*self.adds, 99]}

    smollm2 = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>", 3: "<repo_name>", 16: "<empty_output>"}
    assert unused_special_token(Stub(smollm2, unk=0, bos=1, eos=2)) == "<empty_output>"
    llama3 = {
        128000: "<|begin_of_text|>",
        128001: "<|end_of_text|>",
        128255: "<|reserved_special_token_247|>",
    }
    # the highest unused id, and never one the tokenizer adds to a text itself (Llama 3's BOS)
    assert unused_special_token(Stub(llama3, bos=128000, eos=128001)) == "<|reserved_special_token_247|>"
    assert unused_special_token(Stub({5: "<x>", 7: "<y>"}, eos=5, adds=[7])) is None
    assert (
        unused_special_token(Stub({50256: "<|endoftext|>"}, bos=50256, eos=50256, unk=50256)) is None
    )  # GPT-2
