"""teacher.py and distillation through it: the three teacher sources agree, alpha=0 is plain fine-tuning,
the hidden-state loss and its errors, teachers that cannot be used, and a 2-process KD run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import accelerate_launch, read_summary, run_cli, save_tiny_classifier, tiny_overrides
from scalelora.config import load_config
from scalelora.errors import ConfigError, UserError
from scalelora.teacher import CachedTeacher, ModelTeacher, SelfTeacher
from scalelora.teacher_logits import build_cache
from scalelora.train import main
from scalelora.trainer import Trainer


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_bert) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("tiny-teacher"), tiny_bert)


KD = {"distill.enabled": "true", "distill.weight": 0.5, "distill.temperature": 2.0, "lora.dropout": 0.0}


def loss_parts(trainer: Trainer, batch: dict) -> dict[str, torch.Tensor]:
    """The loss parts of `trainer.compute_loss` on a batch, with the student in eval mode (deterministic)."""
    trainer.model.eval()
    batch = dict(batch)
    labels, idx = batch.pop("labels"), batch.pop("idx")
    with torch.no_grad():
        _, parts = trainer.compute_loss(batch, labels, idx)
    return parts


def test_self_model_and_cache_teachers_give_the_same_kd_loss(tiny_teacher, toy_data, tmp_path):
    cfg = load_config("quickstart", tiny_overrides(tiny_teacher, toy_data, tmp_path / "student", **KD))
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        assert isinstance(trainer.teacher, SelfTeacher)
        batch = next(iter(trainer.train_loader))
        with torch.no_grad():  # move the student away from its base so KL > 0
            for name, param in trainer.model.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    param.add_(torch.randn_like(param))
        from_self = loss_parts(trainer, batch)

        cfg.distill.teacher = str(tiny_teacher)
        trainer.teacher = ModelTeacher(
            cfg, trainer.label_names, trainer.tokenizer, trainer.accelerator.device
        )
        from_model = loss_parts(trainer, batch)

        build_cache(cfg, str(tiny_teacher), tmp_path / "cache", shard_size=40)
        trainer.teacher = CachedTeacher(
            tmp_path / "cache",
            trainer.splits.fingerprints["train"],
            trainer.label_names,
            trainer.accelerator.device,
        )
        from_cache = loss_parts(trainer, batch)

        # hidden-state loss: available from a model teacher, refused from logits alone
        trainer.cfg.distill.hidden_weight = 1.0
        with pytest.raises(ConfigError, match="hidden states"):
            loss_parts(trainer, batch)
        trainer.teacher = SelfTeacher()
        with_hidden = loss_parts(trainer, batch)
    finally:
        trainer.close()
    assert float(from_self["kd"]) > 0.05
    for parts in (from_model, from_cache):
        torch.testing.assert_close(parts["kd"], from_self["kd"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(parts["hard"], from_self["hard"])
    assert float(with_hidden["hidden"]) > 0
    # one batch on its own: (0.5 CE + 0.5 KD + hidden) / N (no class weights, so sum w_i = N)
    n = float(from_self["weight"])
    expected = (0.5 * from_self["hard"] + 0.5 * from_self["kd"] + with_hidden["hidden"]) / n
    torch.testing.assert_close(with_hidden["total"], expected, rtol=1e-5, atol=1e-6)


def trained_adapter(teacher: Path, data: Path, out: Path, **extra) -> dict[str, torch.Tensor]:
    cfg = load_config("quickstart", tiny_overrides(teacher, data, out, **{"train.max_steps": 3, **extra}))
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.close()
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_alpha_zero_equals_no_distillation_and_alpha_half_differs(tiny_teacher, toy_data, tmp_path):
    plain = trained_adapter(tiny_teacher, toy_data, tmp_path / "plain", **{"lora.dropout": 0.1})
    alpha0 = trained_adapter(
        tiny_teacher, toy_data, tmp_path / "alpha0", **{**KD, "distill.weight": 0.0, "lora.dropout": 0.1}
    )
    alpha_half = trained_adapter(tiny_teacher, toy_data, tmp_path / "alpha05", **{**KD, "lora.dropout": 0.1})
    assert plain.keys() == alpha0.keys()
    for key in plain:
        assert torch.equal(plain[key], alpha0[key]), key
    assert any(not torch.allclose(plain[k], alpha_half[k]) for k in plain)
    summary = read_summary(tmp_path / "alpha05")
    assert summary["distill"]["enabled"] is True and summary["distill"]["weight"] == 0.5


def test_hidden_loss_with_another_width_is_a_clear_error(tiny_teacher, toy_data, tmp_path, tiny_bert, capsys):
    wide = save_tiny_classifier(tmp_path / "wide", tiny_bert, hidden=48)
    out = tmp_path / "run"
    args = tiny_overrides(
        tiny_teacher, toy_data, out, **{**KD, "distill.teacher": wide, "distill.hidden_weight": 1.0}
    )
    assert main(["--config", "quickstart", *args]) == 2
    err = capsys.readouterr().err
    assert "scalelora: error: distill.hidden_weight: hidden sizes differ" in err
    assert "(8, 32) vs teacher (8, 48)" in err and "Traceback" not in err


def test_teachers_with_other_labels_or_another_tokenizer_are_refused(
    tiny_teacher, toy_data, tmp_path, tiny_bert
):
    from transformers import AutoTokenizer

    cfg = load_config("quickstart", tiny_overrides(tiny_teacher, toy_data, tmp_path / "x", **KD))
    student_tok = AutoTokenizer.from_pretrained(tiny_bert)
    other_labels = save_tiny_classifier(tmp_path / "labels", tiny_bert, labels=("bad", "good"))
    cfg.distill.teacher = str(other_labels)
    with pytest.raises(UserError, match=r"classifier for labels \['bad', 'good'\]"):
        ModelTeacher(cfg, ["neg", "pos"], student_tok, torch.device("cpu"))

    small_vocab = student_tok.train_new_from_iterator(
        ["the film was great", "dull plot"] * 20, vocab_size=150
    )
    other_tok = save_tiny_classifier(tmp_path / "tok", tiny_bert, tokenizer=small_vocab)
    cfg.distill.teacher = str(other_tok)
    with pytest.raises(ConfigError, match="another tokenizer.*distill.teacher=cache"):
        ModelTeacher(cfg, ["neg", "pos"], student_tok, torch.device("cpu"))


@pytest.mark.parametrize(
    ("precision", "attn", "dtype"), [("no", "sdpa", torch.float32), ("bf16", "eager", torch.bfloat16)]
)
def test_a_model_teacher_runs_in_the_runs_precision_with_its_attention(
    tiny_teacher, toy_data, tmp_path, precision, attn, dtype
):
    """Accelerate autocasts only the model it prepared (the student, and the self-teacher inside it): a
    separate teacher gets the run's autocast itself, and the student's model.attn_implementation."""
    from scalelora.models import load_tokenizer

    settings = {
        **KD,
        "distill.teacher": tiny_teacher,
        "train.precision": precision,
        "model.attn_implementation": attn,
    }
    cfg = load_config("quickstart", tiny_overrides(tiny_teacher, toy_data, tmp_path / "run", **settings))
    tokenizer = load_tokenizer(cfg.model)
    teacher = ModelTeacher(cfg, ["neg", "pos"], tokenizer, torch.device("cpu"))
    assert teacher.model.config._attn_implementation == attn
    seen = []
    layer = next(m for m in teacher.model.modules() if isinstance(m, torch.nn.Linear))
    layer.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    batch = dict(tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt"))
    out = teacher(None, batch, torch.arange(2), want_hidden=True)
    assert seen == [dtype]
    assert out.logits.dtype == out.pooled.dtype == torch.float32  # as the student's (Accelerate's cast)
    # and a whole KD run from it, the hidden-state loss included
    args = tiny_overrides(
        tiny_teacher, toy_data, tmp_path / "run", **settings, **{"distill.hidden_weight": 1.0}
    )
    assert main(["--config", "quickstart", *args]) == 0
    assert read_summary(tmp_path / "run")["precision"] == precision


@pytest.mark.slow
def test_two_process_kd_run(tiny_teacher, toy_data, tmp_path):
    out = tmp_path / "kd2"
    args = tiny_overrides(tiny_teacher, toy_data, out, **{**KD, "train.max_steps": 4, "train.batch_size": 4})
    result = run_cli(
        "scalelora.train", ["--config", "quickstart", *args], launcher=accelerate_launch(2, "cpu_2proc.yaml")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(out)
    assert summary["world_size"] == 2 and summary["distill"]["teacher"] == "self"
    assert summary["eval"]["validation"]["num_examples"] == 40  # gathered without padding duplicates
    losses = [
        json.loads(line)["loss"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "train"
    ]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_a_full_fine_tune_is_a_teacher_whose_head_is_kept(tiny_bert, toy_data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from scalelora.config import LoraConfig, ModelConfig
    from scalelora.models import build_model, count_params

    out = tmp_path / "teacher"
    cfg = load_config(
        "quickstart", tiny_overrides(tiny_bert, toy_data, out, **{"model.mode": "full", "train.max_steps": 3})
    )
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.close()
    model_dir = out / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    teacher = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert teacher.config.id2label == {0: "neg", 1: "pos"}

    student = build_model(ModelConfig(name=str(model_dir)), LoraConfig(dropout=0.0), ["neg", "pos"]).eval()
    batch = {
        "input_ids": torch.tensor([[101, 2307, 2143, 102]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
    }
    with torch.no_grad():
        # LoRA starts at zero and the trained head is kept: the student starts exactly at the teacher
        torch.testing.assert_close(student(**batch).logits, teacher(**batch).logits)
    frozen_head = build_model(
        ModelConfig(name=str(model_dir), train_head=False), LoraConfig(), ["neg", "pos"]
    )
    assert count_params(frozen_head).trainable < count_params(student).trainable
    with pytest.raises(
        UserError, match=r"classifier for labels \['neg', 'pos'\], but the data has \['a', 'b'\]"
    ):
        build_model(ModelConfig(name=str(model_dir)), LoraConfig(), ["a", "b"])
