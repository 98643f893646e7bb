"""8-bit and 4-bit (nf4) bases with LoRA through bitsandbytes: quantized layers, a float head and float
LoRA weights, real training steps on CPU, and refusals of what cannot work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_summary, tiny_overrides
from scalelora.checkpoint import check_adapter_weights
from scalelora.config import load_config
from scalelora.errors import ConfigError
from scalelora.models import build_model
from scalelora.train import main

bnb = pytest.importorskip(
    "bitsandbytes", reason="bitsandbytes is not installed (pip install 'scalelora[bnb]')"
)


def quantized_model(tiny_bert, *overrides: str):
    cfg = load_config("quickstart", [f"model.name={tiny_bert}", *overrides])
    return cfg, build_model(cfg.model, cfg.lora, ["neg", "pos"], device_map="cpu")


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
@pytest.mark.parametrize(
    ("flag", "layer_type"),
    [("load_in_8bit", "Linear8bitLt"), ("load_in_4bit", "Linear4bit")],
)
def test_quantized_base_keeps_head_and_lora_in_float(request, fixture, flag, layer_type):
    cfg, model = quantized_model(request.getfixturevalue(fixture), f"model.{flag}=true")
    modules = dict(model.named_modules())
    query = next(
        m
        for n, m in modules.items()
        if n.endswith(("layer.0.attention.self.query", "layers.0.self_attn.q_proj"))
    )
    assert type(query.base_layer).__name__ == layer_type
    # the head (BERT `classifier`, Llama `score`) is skipped by quantization (llm_int8_skip_modules), else
    # PEFT cannot make it trainable
    head_name = "score" if fixture == "tiny_llama" else "classifier"
    head = modules[f"base_model.model.{head_name}.modules_to_save.default"]
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(head_name in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert not any(type(m).__name__ == layer_type for n, m in modules.items() if head_name in n)


def test_4bit_uses_nf4_double_quant_and_storage_of_the_param_dtype(tiny_bert):
    from scalelora.models import quantization_config

    cfg = load_config("quickstart", [f"model.name={tiny_bert}", "model.load_in_4bit=true"])
    quant = quantization_config(cfg.model)
    assert quant.bnb_4bit_quant_type == "nf4"
    assert quant.bnb_4bit_use_double_quant is True
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    assert quant.bnb_4bit_quant_storage == torch.float32  # = model.dtype, so ZeRO-3 can shard it
    bf16 = load_config(
        "quickstart", ["model.load_in_4bit=true", "model.dtype=bfloat16", "train.precision=bf16"]
    )
    assert quantization_config(bf16.model).bnb_4bit_quant_storage == torch.bfloat16


def test_kbit_preparation_turns_on_non_reentrant_checkpointing(tiny_bert):
    _, model = quantized_model(tiny_bert, "model.load_in_4bit=true", "model.gradient_checkpointing=true")
    layer = model.base_model.model.bert.encoder.layer[0]
    assert layer.gradient_checkpointing
    assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}


@pytest.mark.parametrize(
    ("overrides", "on"),
    [
        (["model.load_in_4bit=true"], True),
        (["model.load_in_8bit=true"], True),
        (["model.load_in_4bit=true", "model.gradient_checkpointing=false"], False),
        ([], False),
    ],
)
def test_checkpointing_is_on_by_default_for_a_kbit_base_only(tiny_llama, overrides, on):
    from scalelora.models import finish_model, load_classifier

    cfg = load_config("quickstart", [f"model.name={tiny_llama}", *overrides])
    assert cfg.model.gradient_checkpointing == "auto" or overrides[-1].endswith("=false")
    base, new_modules = load_classifier(cfg.model, ["neg", "pos"], device_map="cpu")
    lines: list[str] = []
    model = finish_model(base, new_modules, cfg.model, cfg.lora, echo=lines.append)
    assert all(layer.gradient_checkpointing is on for layer in model.base_model.model.model.layers)
    said = [line for line in lines if "gradient checkpointing on" in line]
    assert len(said) == on and (not on or "model.gradient_checkpointing=auto" in said[0])


def test_checkpointing_changes_no_gradient_so_a_resume_may_change_it(tiny_llama):
    """model.gradient_checkpointing is a `free` key (a resumed run may have another value, e.g. a run
    started before `auto` resumed after it): with dropout, the recomputed forward draws the same masks."""
    from scalelora.models import use_mask_dropout

    grads = {}
    for setting in ("true", "false"):
        torch.manual_seed(0)  # the same new head and LoRA weights
        _, model = quantized_model(
            tiny_llama,
            "model.load_in_4bit=true",
            f"model.gradient_checkpointing={setting}",
            "lora.dropout=0.3",
        )
        for name, param in model.named_parameters():
            if "lora_B" in name:  # non-zero, so LoRA A gets a gradient too
                param.data = torch.randn_like(param) * 0.1
        use_mask_dropout(model)
        model.train()
        torch.manual_seed(1)  # the same dropout masks
        ids = torch.randint(1000, 2000, (4, 12))
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
        grads[setting] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["true"].keys() == grads["false"].keys() and any("lora_A" in n for n in grads["true"])
    for name, grad in grads["true"].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, grads["false"][name], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("flag", ["load_in_8bit", "load_in_4bit"])
def test_quantized_lora_trains_on_cpu_and_saves_a_float_adapter(tiny_bert, toy_data, tmp_path, flag):
    out = tmp_path / flag
    # eval before training on purpose: bitsandbytes' CPU inference repacking must not break the next step
    overrides = tiny_overrides(
        tiny_bert, toy_data, out, **{f"model.{flag}": "true", "train.max_steps": 4, "eval.every": 2}
    )
    assert main(["--config", "quickstart", *overrides]) == 0
    summary = read_summary(out)
    assert summary["global_step"] == 4
    assert 0.0 <= summary["eval"]["validation"]["accuracy"] <= 1.0
    assert check_adapter_weights(out / "adapter", r=8) > 0
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]
    assert all(v.dtype == torch.float32 for v in tensors.values())
    assert any(float(v.abs().max()) > 0 for v in lora_b), "LoRA B is still zero: no training step happened"


@pytest.mark.parametrize("flag", ["load_in_8bit", "load_in_4bit"])
def test_full_fine_tune_of_a_quantized_base_is_refused_with_the_fix(flag, tmp_path, capsys):
    with pytest.raises(
        ConfigError, match=r"model\.mode=full cannot train a quantized base: use model\.mode=lora"
    ):
        load_config("quickstart", [f"model.{flag}=true", "model.mode=full"])
    assert (
        main(["--config", "quickstart", f"model.{flag}=true", "model.mode=full", f"output_dir={tmp_path}"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scalelora: error: model.mode=full")


def test_a_device_bitsandbytes_does_not_support_is_refused(monkeypatch):
    monkeypatch.setattr(
        bnb, "supported_torch_devices", {"cuda"} if not torch.cuda.is_available() else {"cpu"}
    )
    with pytest.raises(ConfigError, match=r"has no (cpu|cuda) backend .*: set both to false"):
        load_config("quickstart", ["model.load_in_8bit=true"])
    load_config("quickstart")  # unquantized runs are not affected


def test_8bit_and_4bit_together_are_refused():
    with pytest.raises(ConfigError, match="exclusive"):
        load_config("quickstart", ["model.load_in_8bit=true", "model.load_in_4bit=true"])


@pytest.mark.gpu
def test_4bit_lora_trains_on_gpu_in_bf16(tiny_bert, toy_data, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (scripts/gpu_check.sh runs the full GPU matrix)")
    out = tmp_path / "gpu4"
    overrides = tiny_overrides(
        tiny_bert,
        toy_data,
        out,
        **{"model.load_in_4bit": "true", "train.precision": "bf16", "train.max_steps": 4},
    )
    assert main(["--config", "quickstart", *overrides]) == 0
    assert check_adapter_weights(out / "adapter", r=8) > 0


PROB_TOLERANCE_4BIT = 0.05


def test_an_adapter_trained_on_a_4bit_base_predicts_alike_on_the_full_precision_base(
    tiny_decoder, toy_data, tmp_path, capsys
):
    """predict and export load the base in full precision (no bitsandbytes). The adapter trained on the
    4-bit (nf4) base loads there exactly as trained (its weights on the float32 base, to 1e-5), and its
    probabilities differ from the 4-bit model's by the 4-bit rounding of the base only (within 0.05)."""
    from scalelora.evaluation import gather_logits
    from scalelora.models import build_model, encode_batch
    from scalelora.predict import load_for_inference
    from scalelora.runtime import unwrap_model
    from scalelora.trainer import Trainer

    out = tmp_path / "run"
    overrides = {"model.load_in_4bit": "true", "train.max_steps": 3, "eval.calibrate": "false"}
    cfg = load_config("quickstart", tiny_overrides(tiny_decoder, toy_data, out, **overrides))
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        trainer.train()
        outputs = gather_logits(trainer.accelerator, trainer.model, trainer.eval_loaders["test"])
        trained = {
            n: p.detach().clone()
            for n, p in unwrap_model(trainer.model).named_parameters()
            if p.requires_grad
        }
    finally:
        trainer.close()
    assert "gradient checkpointing on for the 4-bit base" in capsys.readouterr().err
    quantized = torch.from_numpy(outputs.logits)[torch.from_numpy(outputs.idx).argsort()]
    texts = [json.loads(line)["text"] for line in (toy_data / "test.jsonl").read_text().splitlines()]
    model, tokenizer, labels, max_length = load_for_inference(out / "adapter")
    assert not any("4bit" in type(m).__name__ for m in model.modules())
    # the trained LoRA and head weights put on a float32 base by hand
    by_hand = build_model(load_config("quickstart", [f"model.name={tiny_decoder}"]).model, cfg.lora, labels)
    assert set(trained) == {n for n, p in by_hand.named_parameters() if p.requires_grad}
    assert not by_hand.load_state_dict(trained, strict=False).unexpected_keys
    with torch.no_grad():
        batch = encode_batch(tokenizer, texts, None, max_length)
        full, expected = model(**batch).logits, by_hand.eval()(**batch).logits
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=0)
    # nf4 rounds each base weight: on this tiny random Llama the probabilities move by about 0.02, so a
    # label can change only where the 4-bit model was within 2 x 0.05 of a tie
    torch.testing.assert_close(full.softmax(-1), quantized.softmax(-1), atol=PROB_TOLERANCE_4BIT, rtol=0)
    assert not torch.allclose(full, quantized, atol=1e-4)  # the 4-bit base did round something
