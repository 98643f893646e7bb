"""Multi-label classification end to end on a tiny model and a learnable 3-label toy set: outputs and
calibration.json, predict and export reproduce the run's numbers, W&B, accumulation, resume, full
mode, distillation in sigmoid space from the three teacher sources, and two processes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import accelerate_launch, read_summary, run_cli, tiny_overrides
from scalelora.config import load_config
from scalelora.data import PadCollator
from scalelora.errors import ConfigError
from scalelora.evaluation import multi_label_metrics
from scalelora.losses import kd_sigmoid_sum
from scalelora.train import main
from scalelora.trainer import Trainer
from test_trainer import adapter_tensors, assert_same_adapter, captured_grads, interrupted_copy, train_losses
from wandb_records import offline_runs, read_wandb_run

LABELS = ["joy", "anger", "fear"]
RUN = {"train.max_steps": 8, "eval.every": 4, "train.log_every": 2, "eval.metric": "macro_f1"}


def ml_args(model: Path, data: Path, out: Path, **extra: object) -> list[str]:
    return ["--config", "quickstart", *tiny_overrides(model, data, out, **{**RUN, **extra})]


def gold_sets(data: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ml_run(tiny_bert, toy_multilabel, tmp_path_factory) -> tuple[Path, str]:
    """One finished multi-label CLI run (per-label pos_weight, W&B offline), shared read-only."""
    out = tmp_path_factory.mktemp("multi") / "run"
    extra = {
        "train.class_weights": "balanced",
        "tracking.report_to": "wandb",
        "tracking.wandb.mode": "offline",
        # at the suite's lr (5e-3) 8 steps leave every probability within 2e-4 of 0.5 and of its tuned
        # threshold, too close for the predict test to judge any (row, label); at 0.1 it judges all 120
        "train.lr": 0.1,
    }
    done = run_cli("scalelora.train", ml_args(tiny_bert, toy_multilabel, out, **extra))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stderr


def test_a_multi_label_run_reports_and_stores_its_decision_rule(ml_run, toy_multilabel):
    out, stderr = ml_run
    summary = read_summary(out)
    assert summary["problem_type"] == "multi_label" and summary["labels"] == LABELS
    # balanced class weights are per-label pos_weight = negatives / positives of the training split
    hot = np.array(
        [[label in row["label"] for label in LABELS] for row in gold_sets(toy_multilabel, "train")]
    )
    expected = (len(hot) - hot.sum(axis=0)) / hot.sum(axis=0)
    assert list(summary["class_weights"].values()) == pytest.approx(expected.tolist())
    assert "per-label pos_weight (balanced): joy=" in stderr
    for split in ("validation", "test"):
        m = summary["eval"][split]
        assert {
            "accuracy",
            "macro_f1",
            "micro_f1",
            "per_class",
            "confusion_per_label",
            "ece",
            "nll",
        } <= m.keys()
        assert {"calibrated", "tuned", "reliability"} <= m.keys() and "confusion_matrix" not in m
        assert m["num_examples"] == 40
        assert sum(c["tp"] + c["fn"] for c in m["confusion_per_label"].values()) == sum(
            c["support"] for c in m["per_class"].values()
        )
    val = summary["eval"]["validation"]
    # tuned on validation: never below p >= 0.5 there; T minimises the validation NLL
    assert val["tuned"]["macro_f1"] >= val["macro_f1"] and val["tuned"]["tuned_for"] == "macro_f1"
    assert val["calibrated"]["nll"] <= val["nll"] + 1e-9
    # every evaluation tuned its thresholds, and the best checkpoint is the best tuned macro-F1
    assert summary["best"]["value"] == pytest.approx(val["tuned"]["macro_f1"])
    stored = json.loads((out / "adapter" / "calibration.json").read_text())
    meta = json.loads((out / "adapter" / "scalelora.json").read_text())
    assert stored == summary["calibration"] and meta["calibration"] == "calibration.json"
    assert meta["problem_type"] == "multi_label" and stored["labels"] == LABELS
    assert len(stored["thresholds"]) == 3 and stored["biases"] is None and stored["temperature"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in evals] == [4, 8] and all(
        {"micro_f1", "tuned_macro_f1"} <= r.keys() for r in evals
    )
    assert {"final_validation", "final_test"} <= {r["split"] for r in records}
    report = (out / "report.md").read_text()
    for heading in (
        "## Tuned decision rule",
        "## Calibration",
        "## Per-class report (test, tuned thresholds)",
        "## Confusion per label (test; p >= 0.5)",
        "![reliability diagram per split, before and after calibration](reliability.png)",
    ):
        assert heading in report, heading
    assert (out / "reliability.png").read_bytes().startswith(b"\x89PNG")


def test_predict_reproduces_the_runs_tuned_test_metrics_and_samples(ml_run, toy_multilabel, tmp_path, capsys):
    from scalelora.predict import main as predict_main

    out, _ = ml_run
    summary = read_summary(out)
    rows = gold_sets(toy_multilabel, "test")
    path = tmp_path / "p.jsonl"
    assert (
        predict_main(
            ["--adapter", str(out), "--input", str(toy_multilabel / "test.jsonl"), "--output", str(path)]
        )
        == 0
    )
    predicted = [json.loads(line) for line in path.read_text().splitlines()]
    gold = np.array([[label in r["label"] for label in LABELS] for r in rows]).astype(int)
    pred = np.array([[label in p["labels"] for label in LABELS] for p in predicted]).astype(int)
    again = multi_label_metrics(pred, gold, LABELS)
    tuned = summary["eval"]["test"]["tuned"]
    for key in ("accuracy", "macro_f1", "micro_f1"):
        assert again[key] == pytest.approx(tuned[key], abs=1e-12), key
    # each printed set is every label whose probability reaches its stored threshold, most probable first
    # (the printed probabilities are rounded to 6 digits: a label that close to its threshold is not judged)
    thresholds = dict(zip(LABELS, summary["calibration"]["thresholds"], strict=True))
    judged = []
    for p in predicted:
        assert [p["probs"][k] for k in p["labels"]] == sorted(
            (p["probs"][k] for k in p["labels"]), reverse=True
        )
        for k in LABELS:
            if abs(p["probs"][k] - thresholds[k]) > 1e-5:
                assert (k in p["labels"]) == (p["probs"][k] >= thresholds[k]), (p, k)
                judged.append(p["probs"][k] >= thresholds[k])
    # most (row, label) pairs are judged, on both sides of their threshold
    assert len(judged) >= 0.9 * len(predicted) * len(LABELS), f"{len(judged)} (row, label) pairs judged"
    assert set(judged) == {True, False}, "every judged label fell on one side of its threshold"
    # the samples the run reported after training, from the reloaded adapter
    samples = summary["sample_predictions"]
    capsys.readouterr()
    assert (
        predict_main(["--adapter", str(out / "adapter"), *sum((["--text", s["text"]] for s in samples), [])])
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for sample, line in zip(samples, lines, strict=True):
        assert line["labels"] == sample["after"]
        assert [line["probs"][k] for k in sample["after"]] == pytest.approx(
            sample["after_confidence"], abs=1e-5
        )
    # --threshold replaces every threshold, --top-k keeps the most probable of the set
    capsys.readouterr()
    texts = sum((["--text", s["text"]] for s in samples[:2]), [])
    assert predict_main(["--adapter", str(out), *texts, "--threshold", "0", "--top-k", "2"]) == 0
    for line in map(json.loads, capsys.readouterr().out.splitlines()):
        assert line["labels"] == sorted(LABELS, key=lambda k: -line["probs"][k])[:2]


def test_export_writes_problem_type_labels_and_thresholds(ml_run, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from scalelora.export import main as export_main
    from scalelora.predict import main as predict_main

    out, _ = ml_run
    stored = json.loads((out / "adapter" / "calibration.json").read_text())
    merged = tmp_path / "merged"
    assert export_main(["--adapter", str(out), "--merge", "--out", str(merged)]) == 0
    config = json.loads((merged / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert [config["id2label"][str(i)] for i in range(3)] == LABELS
    assert config["decision_thresholds"] == dict(zip(LABELS, stored["thresholds"]))
    exported = json.loads((merged / "calibration.json").read_text())
    assert exported["temperature_in_weights"] and exported["thresholds"] == stored["thresholds"]
    # transformers alone: sigmoid of the plain model's logits is what predict prints for the adapter
    texts = ["a great and scary story", "the plot was awful"]
    model = AutoModelForSequenceClassification.from_pretrained(str(merged)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    with torch.inference_mode():
        probs = torch.sigmoid(model(**tokenizer(texts, padding=True, return_tensors="pt")).logits).numpy()
    capsys.readouterr()
    assert predict_main(["--adapter", str(out), *sum((["--text", t] for t in texts), [])]) == 0
    from_adapter = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert predict_main(["--adapter", str(merged), *sum((["--text", t] for t in texts), [])]) == 0
    from_export = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for row, a, b in zip(probs, from_adapter, from_export, strict=True):
        assert [a["probs"][k] for k in LABELS] == pytest.approx(row.tolist(), abs=2e-6)
        assert a["labels"] == b["labels"] and a["probs"] == pytest.approx(b["probs"], abs=2e-6)


def test_wandb_receives_the_multi_label_metrics(ml_run):
    out, _ = ml_run
    (path,) = offline_runs(out)
    run = read_wandb_run(path)
    for key in ("eval/micro_f1", "eval/tuned/macro_f1", "eval/nll"):
        assert [row["_step"] for row in run["history"] if key in row] == [4, 8], key
    summary, written = run["summary"], read_summary(out)
    test = written["eval"]["test"]
    assert summary["final/test/micro_f1"] == pytest.approx(test["micro_f1"])
    assert summary["final/test/tuned/macro_f1"] == pytest.approx(test["tuned"]["macro_f1"])
    assert summary["final/test/calibrated/ece"] == pytest.approx(test["calibrated"]["ece"])
    assert summary["final/validation/calibrated/temperature"] == pytest.approx(
        written["calibration"]["temperature"]
    )
    final = [row for row in run["history"] if "sample_predictions/path" in row]
    assert len(final) == 1 and any(k.startswith("confusion_per_label/test") for k in final[0])


def test_accumulated_multi_label_micro_batches_give_the_gradients_of_one_big_batch(tmp_path, toy_multilabel):
    from conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "m", "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    settings = {
        "train.grad_accum": 4,
        "train.max_grad_norm": "null",
        "model.mode": "full",
        "train.class_weights": "balanced",
        "train.loss": "focal",
        "train.label_smoothing": 0.1,
    }
    trainer = Trainer(
        load_config("quickstart", tiny_overrides(model, toy_multilabel, tmp_path / "out", **settings))
    )
    trainer.setup()
    try:
        rows = [trainer.tokenized["train"][i] for i in range(30)]
        collate = PadCollator(0, pad_to_multiple_of=max(len(r["input_ids"]) for r in rows))
        micro = [collate(rows[i : i + 8]) for i in range(0, 30, 8)]
        assert micro[0]["labels"].shape == (8, 3) and micro[0]["labels"].dtype == torch.float32
        accumulated = captured_grads(trainer, micro)
        trainer.accelerator.gradient_accumulation_steps = 1
        trainer.cfg.train.grad_accum = 1
        whole = captured_grads(trainer, [collate(rows)])
    finally:
        trainer.close()
    assert accumulated.keys() == whole.keys() and len(whole) > 10
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], atol=1e-6, rtol=1e-5, msg=name)


def test_multi_label_resume_and_full_mode(tiny_bert, toy_multilabel, tmp_path):
    settings = {"checkpoint.every": 2, "checkpoint.keep_last": 4, "eval.load_best_at_end": "false"}
    full = tmp_path / "full"
    assert main(ml_args(tiny_bert, toy_multilabel, full, **settings)) == 0
    resumed = tmp_path / "resumed"
    interrupted_copy(full, resumed, keep_step=4)
    assert main([*ml_args(tiny_bert, toy_multilabel, resumed, **settings), "resume=auto"]) == 0
    assert_same_adapter(full, resumed)
    assert read_summary(resumed)["eval"]["test"]["tuned"] == read_summary(full)["eval"]["test"]["tuned"]
    # a full fine-tune saves a plain multi-label transformers model with its calibration beside it
    out = tmp_path / "model"
    assert main(ml_args(tiny_bert, toy_multilabel, out, **{"model.mode": "full", "train.max_steps": 4})) == 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert json.loads((out / "model" / "calibration.json").read_text())["labels"] == LABELS


def multi_label_teacher(folder: Path, tokenizer_dir: Path) -> Path:
    from conftest import save_tiny_classifier

    return save_tiny_classifier(folder, tokenizer_dir, labels=tuple(LABELS))


def test_kd_in_sigmoid_space_from_the_three_teacher_sources(tiny_bert, toy_multilabel, tmp_path):
    from scalelora.teacher import CachedTeacher, CalibratedTeacher, ModelTeacher, SelfTeacher, build_teacher
    from scalelora.teacher_logits import build_cache
    from test_teacher import loss_parts

    teacher = multi_label_teacher(tmp_path / "teacher", tiny_bert)
    kd = {"distill.enabled": "true", "distill.weight": 0.5, "distill.temperature": 2.0, "lora.dropout": 0.0}
    cfg = load_config("quickstart", tiny_overrides(teacher, toy_multilabel, tmp_path / "student", **kd))
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        assert isinstance(trainer.teacher, SelfTeacher) and trainer.multi_label
        batch = next(iter(trainer.train_loader))
        with torch.no_grad():  # move the student away from its base so the KL is not ~0
            for name, param in trainer.model.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    param.add_(torch.randn_like(param))
        from_self = loss_parts(trainer, batch)
        cfg.distill.teacher = str(teacher)
        trainer.teacher = ModelTeacher(
            cfg, trainer.label_names, trainer.tokenizer, trainer.accelerator.device
        )
        from_model = loss_parts(trainer, batch)
        build_cache(cfg, str(teacher), tmp_path / "cache", shard_size=40)
        trainer.teacher = CachedTeacher(
            tmp_path / "cache",
            trainer.splits.fingerprints["train"],
            trainer.label_names,
            trainer.accelerator.device,
        )
        from_cache = loss_parts(trainer, batch)
        # by hand: T^2 * per-label binary KL between the teacher's and the student's sigmoid(logits / T)
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "idx")}
        with torch.no_grad():
            student = trainer.model(**inputs).logits
            with trainer.model.disable_adapter():
                teacher_logits = trainer.model(**inputs).logits
        by_hand = kd_sigmoid_sum(student, teacher_logits, 2.0)

        # distill.calibrated_teacher: the teacher's logits divided by the temperature it stores
        calibrated = tmp_path / "calibrated-teacher"
        shutil.copytree(teacher, calibrated)
        (calibrated / "calibration.json").write_text(
            json.dumps({"format": 1, "problem_type": "multi_label", "labels": LABELS, "temperature": 2.5})
        )
        cfg.distill.teacher, cfg.distill.calibrated_teacher = str(calibrated), True
        trainer.teacher = build_teacher(
            cfg, LABELS, trainer.tokenizer, "", trainer.accelerator.device, "multi_label"
        )
        assert isinstance(trainer.teacher, CalibratedTeacher) and trainer.teacher.temperature == 2.5
        from_calibrated = loss_parts(trainer, batch)
        manifest = build_cache(cfg, str(calibrated), tmp_path / "cache2", shard_size=40)
        assert manifest["teacher_temperature"] == 2.5 and manifest["logits_calibrated"] is False
        assert manifest["problem_type"] == "multi_label"
        # a teacher whose config.json says it is a single-label classifier is refused
        single = tmp_path / "single-teacher"
        shutil.copytree(teacher, single)
        config = json.loads((single / "config.json").read_text())
        (single / "config.json").write_text(
            json.dumps({**config, "problem_type": "single_label_classification"})
        )
        cfg.distill.teacher, cfg.distill.calibrated_teacher = str(single), False
        with pytest.raises(ConfigError, match="is a single_label classifier but the data is multi_label"):
            build_teacher(cfg, LABELS, trainer.tokenizer, "", "cpu", "multi_label")
        cfg.distill.teacher, cfg.distill.cache_dir = "cache", str(tmp_path / "cache")
        cfg.distill.calibrated_teacher = True
        with pytest.raises(ConfigError, match="records no fitted temperature"):
            build_teacher(
                cfg, LABELS, trainer.tokenizer, trainer.splits.fingerprints["train"], "cpu", "multi_label"
            )
        with pytest.raises(ConfigError, match="is a multi_label classifier but the data is single_label"):
            build_teacher(
                cfg, LABELS, trainer.tokenizer, trainer.splits.fingerprints["train"], "cpu", "single_label"
            )
    finally:
        trainer.close()
    assert float(from_self["kd"]) > 0.05
    torch.testing.assert_close(from_self["kd"], by_hand, rtol=1e-5, atol=1e-6)
    for parts in (from_model, from_cache):
        torch.testing.assert_close(parts["kd"], from_self["kd"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        from_calibrated["kd"], kd_sigmoid_sum(student, teacher_logits / 2.5, 2.0), rtol=1e-5, atol=1e-6
    )
    # one batch on its own: (0.5 BCE + 0.5 KD) / N, N the number of rows (8), not of label cells (24)
    assert float(from_self["weight"]) == 8
    expected = (0.5 * from_self["hard"] + 0.5 * from_self["kd"]) / 8
    torch.testing.assert_close(from_self["total"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_twice_the_batch_on_multi_label_data(toy_multilabel, tmp_path):
    from conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "m", "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    settings = {
        "train.class_weights": "balanced",
        "train.loss": "focal",
        "train.label_smoothing": 0.1,
        "data.group_by_length": "false",  # the same 16 examples per step, however they are split
        "lora.dropout": 0.0,
        "train.max_steps": 6,
        "train.log_every": 1,
        "eval.every": 6,
        "eval.load_best_at_end": "false",
    }
    one, two = tmp_path / "one", tmp_path / "two"
    done = run_cli(
        "scalelora.train", ml_args(model, toy_multilabel, one, **{**settings, "train.batch_size": 16})
    )
    assert done.returncode == 0, done.stderr[-2000:]
    done = run_cli(
        "scalelora.train",
        ml_args(model, toy_multilabel, two, **{**settings, "train.batch_size": 8}),
        launcher=accelerate_launch(2, "cpu_2proc.yaml"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_summary(two)["world_size"] == 2
    assert train_losses(one) == pytest.approx(train_losses(two), rel=1e-5)
    ta, tb = adapter_tensors(one), adapter_tensors(two)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], atol=2e-5, rtol=1e-4, msg=key)
    # evaluation gathers every example once on 2 ranks: the same thresholds and tuned test metrics
    s1, s2 = read_summary(one), read_summary(two)
    assert s2["eval"]["test"]["num_examples"] == 40 and s2["eval"]["test"]["unique_examples"] == 40
    assert s1["calibration"]["thresholds"] == pytest.approx(s2["calibration"]["thresholds"], abs=1e-4)
    assert s1["eval"]["test"]["tuned"]["macro_f1"] == pytest.approx(s2["eval"]["test"]["tuned"]["macro_f1"])
