"""evaluation.py: metrics against hand computation (single- and multi-label), calibration error, and
`evaluate` modules named by the user."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import read_summary, tiny_overrides
from scalelora.evaluation import (
    classification_metrics,
    expected_calibration_error,
    metric_name,
    multi_label_calibration_error,
    multi_label_metrics,
)
from scalelora.train import main

LABELS = ["a", "b", "c"]


def test_accuracy_macro_f1_per_class_and_confusion_match_hand_computation():
    gold = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    m = classification_metrics(pred, gold, LABELS)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # per class (precision, recall): a (1/2, 1/2), b (2/3, 1), c (1, 1/2)
    f1 = [0.5, 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["per_class"]["b"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": f1[1], "support": 2}
    )
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_expected_calibration_error_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    gold = np.array([0, 1, 0, 1])
    # bins: 0.9 (2 examples, accuracy 1/2), 0.6 (1, accuracy 1), 0.7 (1, accuracy 1)
    expected = (2 / 4) * abs(0.5 - 0.9) + (1 / 4) * abs(1 - 0.6) + (1 / 4) * abs(1 - 0.7)
    assert expected_calibration_error(probs, gold) == pytest.approx(expected)


METRIC_MODULE = """
import datasets
import evaluate


class PredictedFirstLabel(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="share of predictions that are label 0",
            citation="",
            inputs_description="predictions and references: label ids",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        return {"first_label_rate": sum(p == 0 for p in predictions) / len(predictions), "accuracy": -1.0}
"""


def write_metric(folder):
    folder.mkdir(parents=True)
    (folder / f"{folder.name}.py").write_text(METRIC_MODULE)
    return folder


def test_a_local_evaluate_module_is_reported_for_every_split(tiny_bert, toy_data, tmp_path):
    module = write_metric(tmp_path / "first_label")
    out = tmp_path / "run"
    extra = {"eval.extra_metrics": f"[{module}]", "eval.trust_remote_code": "true"}
    assert main(["--config", "quickstart", *tiny_overrides(tiny_bert, toy_data, out, **extra)]) == 0
    summary = read_summary(out)
    for split in ("validation", "test"):
        metrics = summary["eval"][split]
        assert 0.0 <= metrics["first_label_rate"] <= 1.0
        # a key a built-in metric already has keeps the built-in value; the module's gets its name
        assert metrics["accuracy"] >= 0 and metrics["first_label/accuracy"] == -1.0
        assert metrics["extra_metrics"] == ["first_label_rate", "first_label/accuracy"]
    assert "first_label_rate" in (out / "report.md").read_text()
    validation_lines = [
        line for line in (out / "metrics.jsonl").read_text().splitlines() if '"validation"' in line
    ]
    assert validation_lines and all("first_label_rate" in line for line in validation_lines)


def test_extra_metrics_need_the_opt_in_and_a_loadable_module(tiny_bert, toy_data, tmp_path, capsys):
    module = write_metric(tmp_path / "first_label")
    args = ["--config", "quickstart", *tiny_overrides(tiny_bert, toy_data, tmp_path / "run")]
    assert main([*args, f"eval.extra_metrics=[{module}]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "set eval.trust_remote_code=true" in err
    assert main([*args, f"eval.extra_metrics=[{tmp_path / 'nowhere'}]", "eval.trust_remote_code=true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load" in err and "nowhere" in err


def test_metric_names_in_outputs():
    assert metric_name("matthews_correlation") == "matthews_correlation"
    assert metric_name("/x/y/first_label") == "first_label"
    assert metric_name("metrics/f.py") == "f"


# --- multi-label metrics, calibration and decision rules ------------------------------------------


def test_multi_label_metrics_match_hand_computation():
    gold = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    pred = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]])
    m = multi_label_metrics(pred, gold, LABELS)
    # subset accuracy: rows 1 and 3 are exactly right
    assert m["accuracy"] == pytest.approx(2 / 4)
    # per label (tp, fp, fn): a (2, 0, 0), b (1, 0, 1), c (1, 1, 1)
    f1 = [1.0, 2 / 3, 0.5]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    assert m["per_class"]["b"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["confusion_per_label"]["c"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 1}
    assert "confusion_matrix" not in m


def test_multi_label_ece_pools_every_label_probability():
    probs = np.array([[0.9, 0.2], [0.9, 0.6]])
    gold = np.array([[1, 0], [0, 1]])
    # bins: 0.9 (2 pairs, present once), 0.2 (1, absent), 0.6 (1, present)
    expected = (2 / 4) * abs(0.5 - 0.9) + (1 / 4) * abs(0 - 0.2) + (1 / 4) * abs(1 - 0.6)
    assert multi_label_calibration_error(probs, gold) == pytest.approx(expected)


def test_save_predictions_writes_each_final_split_in_example_order(tiny_bert, toy_data, tmp_path):
    import json

    out = tmp_path / "run"
    args = tiny_overrides(tiny_bert, toy_data, out, **{"eval.save_predictions": "true", "train.max_steps": 2})
    assert main(["--config", "quickstart", *args]) == 0
    summary = read_summary(out)
    for split in ("validation", "test"):
        gold = [json.loads(line)["label"] for line in (toy_data / f"{split}.jsonl").read_text().splitlines()]
        rows = [
            json.loads(line) for line in (out / "predictions" / f"{split}.jsonl").read_text().splitlines()
        ]
        assert [r["idx"] for r in rows] == list(range(len(gold)))  # every example once, in id order
        assert [r["label"] for r in rows] == gold
        for r in rows:
            assert sum(r["probs"]) == pytest.approx(1.0, abs=1e-4)
            assert r["predicted"] == ["neg", "pos"][int(np.argmax(r["probs"]))]
        accuracy = np.mean([r["predicted"] == r["label"] for r in rows])
        assert accuracy == pytest.approx(summary["eval"][split]["accuracy"])


def test_an_evaluation_on_a_terminal_draws_a_progress_bar(monkeypatch):
    """gather_logits advances a bar per batch on the main process when stderr is a terminal, and draws
    none in a log (the validation line says what the evaluation found)."""
    import sys
    from types import SimpleNamespace

    import torch
    import tqdm.auto

    from scalelora.evaluation import gather_logits

    bars = []

    class Bar:
        def __init__(self, **kwargs):
            self.total, self.done, self.closed = kwargs["total"], 0, False
            bars.append(self)

        def update(self, n):
            self.done += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    model = torch.nn.Linear(3, 2)
    loader = [
        {"x": torch.ones(4, 3), "labels": torch.zeros(4, dtype=torch.long), "idx": torch.arange(4) + 4 * i}
        for i in range(3)
    ]

    class Model(torch.nn.Module):
        def forward(self, x):
            return SimpleNamespace(logits=model(x))

    for terminal, on_main in ((True, True), (False, True), (True, False)):
        monkeypatch.setattr(sys.stderr, "isatty", lambda terminal=terminal: terminal)
        accelerator = SimpleNamespace(is_main_process=on_main, gather_for_metrics=lambda t: t)
        outputs = gather_logits(accelerator, Model(), [dict(b) for b in loader])
        assert outputs.logits.shape == (12, 2) and list(outputs.idx) == list(range(12))
    assert len(bars) == 1 and bars[0].total == 3 and bars[0].done == 3 and bars[0].closed
