"""evaluation.py and calibration.py: metrics against hand computation (single- and multi-label), calibration
error, temperature fitting, tuned decision rules, calibration.json, and `evaluate` modules named by the user."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import read_summary, tiny_overrides
from scalelora.calibration import (
    Calibration,
    fit_temperature,
    negative_log_likelihood,
    read_calibration,
    softmax,
    tune_biases,
    tune_thresholds,
)
from scalelora.errors import CalibrationError
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


def test_threshold_search_finds_the_best_cut_on_a_constructed_case():
    # label 0: positives at 0.35, 0.3, 0.2; negatives at 0.25, 0.1: the best F1 (6/7) predicts the
    # top four (threshold between 0.1 and 0.2) rather than the top two (0.8) or 0.5 (0)
    p0 = [0.35, 0.3, 0.25, 0.2, 0.1]
    y0 = [1, 1, 0, 1, 0]
    # label 1: perfectly separated around 0.7; label 2 has no positive example: it keeps 0.5
    p1 = [0.9, 0.8, 0.75, 0.6, 0.2]
    y1 = [1, 1, 1, 0, 0]
    probs = np.array([p0, p1, [0.4] * 5]).T
    gold = np.array([y0, y1, [0] * 5]).T
    thresholds = tune_thresholds(probs, gold, "macro_f1")
    assert 0.1 < thresholds[0] < 0.2 and thresholds[0] == pytest.approx(0.15)
    assert 0.6 < thresholds[1] < 0.75
    assert thresholds[2] == 0.5
    tuned = multi_label_metrics((probs >= thresholds).astype(int), gold, LABELS)
    assert tuned["per_class"]["a"]["f1"] == pytest.approx(6 / 7) and tuned["per_class"]["b"]["f1"] == 1.0
    # micro-F1 tuning on the same case: never worse than at 0.5, and at least the macro cut's micro-F1
    micro = tune_thresholds(probs, gold, "micro_f1")
    at = lambda t: multi_label_metrics((probs >= t).astype(int), gold, LABELS)["micro_f1"]  # noqa: E731
    assert at(micro) >= max(at(0.5), at(thresholds)) - 1e-12


def test_binary_bias_search_is_the_best_threshold():
    rng = np.random.default_rng(0)
    n = 400
    gold = (rng.random(n) < 0.2).astype(int)  # imbalanced: 20% positive
    margin = rng.normal(size=n) + 1.2 * gold - 0.8  # logit of class 1 minus class 0
    logits = np.stack([np.zeros(n), margin], axis=1)
    biases = tune_biases(logits, gold, "macro_f1")
    tuned = (logits + biases).argmax(axis=1)
    def macro_f1(pred: np.ndarray) -> float:  # by hand, per class 2 tp / (2 tp + fp + fn)
        f1 = []
        for c in (0, 1):
            tp, fp, fn = ((pred == c) & (gold == c)).sum(), ((pred == c) & (gold != c)).sum(), ((pred != c) & (gold == c)).sum()
            f1.append(2 * tp / (2 * tp + fp + fn))
        return sum(f1) / 2

    # every distinct threshold on the margin: between neighbouring sorted values, and beyond both ends
    cuts = np.sort(margin)
    candidates = np.concatenate([[cuts[0] - 1], (cuts[:-1] + cuts[1:]) / 2, [cuts[-1] + 1]])
    best = max(macro_f1((margin > c).astype(int)) for c in candidates)
    got = classification_metrics(tuned, gold, ["neg", "pos"])["macro_f1"]
    assert got == pytest.approx(best, abs=1e-9)
    assert got > classification_metrics(logits.argmax(axis=1), gold, ["neg", "pos"])["macro_f1"]
    # the stored binary threshold is the same rule on p(pos)
    rule = Calibration("single_label", ["neg", "pos"], biases=biases)
    p_pos = 1 / (1 + np.exp(-margin))
    assert np.array_equal(rule.decide(logits), (p_pos > rule.binary_threshold).astype(int))


def test_multiclass_bias_search_improves_macro_f1_and_never_hurts():
    rng = np.random.default_rng(1)
    n, k = 600, 4
    gold = rng.choice(k, size=n, p=[0.6, 0.25, 0.1, 0.05])
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[gold] + np.array([1.5, 0.5, 0.0, -0.5])
    biases = tune_biases(logits, gold, "macro_f1")
    before = classification_metrics(logits.argmax(axis=1), gold, list("abcd"))["macro_f1"]
    after = classification_metrics((logits + biases).argmax(axis=1), gold, list("abcd"))["macro_f1"]
    assert biases[0] == 0.0 and after > before + 0.02


@pytest.mark.parametrize("problem", ["single_label", "multi_label"])
def test_temperature_fitting_recovers_a_known_temperature(problem):
    rng = np.random.default_rng(0)
    true_t = 2.5
    if problem == "single_label":
        logits = rng.normal(size=(20000, 5)) * 4
        p = softmax(logits / true_t)
        gold = (p.cumsum(axis=1) > rng.random((len(p), 1))).argmax(axis=1)
    else:
        logits = rng.normal(size=(8000, 6)) * 4
        gold = (rng.random(logits.shape) < 1 / (1 + np.exp(-logits / true_t))).astype(float)
    fitted = fit_temperature(logits, gold, problem)
    assert fitted == pytest.approx(true_t, rel=0.05)
    # and it is the NLL minimum: a little hotter or colder is worse
    nll = lambda t: negative_log_likelihood(logits / t, gold, problem)  # noqa: E731
    assert nll(fitted) < min(nll(fitted * 0.9), nll(fitted * 1.1), nll(1.0))


def test_calibration_file_round_trip_and_mismatches(tmp_path):
    rule = Calibration("multi_label", ["a", "b"], temperature=1.5, thresholds=[0.3, 0.6], tuned_for="macro_f1")
    (tmp_path / "calibration.json").write_text(json.dumps(rule.to_json()))
    back = read_calibration(tmp_path, ["a", "b"])
    assert back == rule
    logits = np.array([[0.0, 1.0], [2.0, -1.0]])
    assert np.array_equal(back.decide(logits), (1 / (1 + np.exp(-logits / 1.5)) >= [0.3, 0.6]).astype(int))
    with pytest.raises(CalibrationError, match=r"is for labels \['a', 'b'\], but the model has \['a', 'c'\]"):
        read_calibration(tmp_path, ["a", "c"])
    (tmp_path / "calibration.json").write_text(json.dumps({**rule.to_json(), "thresholds": [0.3]}))
    with pytest.raises(CalibrationError, match="2 labels but 1 thresholds"):
        read_calibration(tmp_path, ["a", "b"])
    (tmp_path / "calibration.json").write_text(json.dumps({**rule.to_json(), "temperature": -1}))
    with pytest.raises(CalibrationError, match="temperature must be a positive number"):
        read_calibration(tmp_path, ["a", "b"])
    assert read_calibration(tmp_path / "nowhere", ["a", "b"]) is None
