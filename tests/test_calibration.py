"""calibration.py: temperature scaling recovers a known temperature, tuned thresholds and biases are the
best rules on constructed cases, calibration.json round trips and refuses another model's labels; and
end to end, a calibrated (and bias-tuned) single-label adapter reloads to the same probabilities and
decisions in `predict`, which reproduce the run's tuned test metrics."""

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
from scalelora.evaluation import classification_metrics, multi_label_metrics

LABELS = ["a", "b", "c"]


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
            tp, fp, fn = (
                ((pred == c) & (gold == c)).sum(),
                ((pred == c) & (gold != c)).sum(),
                ((pred != c) & (gold == c)).sum(),
            )
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


def test_nll_by_hand_and_the_temperature_bounds():
    import math

    logits = np.array([[2.0, -1.0], [0.0, 1.0]])
    # single-label: mean of -log softmax(gold)
    expected = (math.log(1 + math.exp(-3)) + math.log(1 + math.exp(1))) / 2
    assert negative_log_likelihood(logits, np.array([0, 0]), "single_label") == pytest.approx(expected)
    # multi-label: mean over rows of the BCE summed over labels
    gold = np.array([[1.0, 0.0], [1.0, 1.0]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    bce = -(math.log(sig(2)) + math.log(1 - sig(-1)) + math.log(sig(0)) + math.log(sig(1)))
    assert negative_log_likelihood(logits, gold, "multi_label") == pytest.approx(bce / 2)
    # a split the logits separate perfectly pushes T towards 0 (sharper is always better): it stays in bounds
    separable = np.array([[3.0, -3.0], [-3.0, 3.0]] * 10)
    gold = np.array([0, 1] * 10)
    fitted = fit_temperature(separable, gold, "single_label")
    assert 0.05 <= fitted < 0.5
    assert negative_log_likelihood(separable / fitted, gold, "single_label") < negative_log_likelihood(
        separable, gold, "single_label"
    )


def test_calibration_file_round_trip_and_mismatches(tmp_path):
    rule = Calibration(
        "multi_label", ["a", "b"], temperature=1.5, thresholds=[0.3, 0.6], tuned_for="macro_f1"
    )
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


# --- end to end: single-label -------------------------------------------------------------------------


def predict_file(adapter, data_file, tmp_path, *flags: str) -> list[dict]:
    from scalelora.predict import main as predict_main

    out = tmp_path / "predictions.jsonl"
    assert (
        predict_main(["--adapter", str(adapter), "--input", str(data_file), "--output", str(out), *flags])
        == 0
    )
    return [json.loads(line) for line in out.read_text().splitlines()]


def raw_logits(adapter, texts: list[str]) -> np.ndarray:
    import torch

    from scalelora.predict import load_for_inference

    model, tokenizer, _, max_length = load_for_inference(adapter)
    with torch.inference_mode():
        encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return model(**encoded).logits.float().numpy()


@pytest.mark.parametrize("calibrate", [True, False], ids=["calibrated", "raw"])
def test_tuned_biases_are_stored_and_predict_reproduces_the_runs_tuned_test_metrics(
    calibrate, tiny_bert, toy_data, tmp_path
):
    from scalelora.train import main

    out = tmp_path / "run"
    extra = {
        "eval.tune_thresholds": "macro_f1",
        "eval.calibrate": str(calibrate).lower(),
        # enough training (24 steps at lr 0.05) that the test rows' p(pos) spread away from the tuned
        # threshold: after 4 steps at 5e-3 the calibrated scores all sat within 1e-6 of it, and the label
        # check below skipped every row
        "train.max_steps": 24,
        "train.lr": 0.05,
    }
    assert main(["--config", "quickstart", *tiny_overrides(tiny_bert, toy_data, out, **extra)]) == 0
    summary = read_summary(out)
    stored = json.loads((out / "adapter" / "calibration.json").read_text())
    meta = json.loads((out / "adapter" / "scalelora.json").read_text())
    assert meta["calibration"] == "calibration.json" and meta["problem_type"] == "single_label"
    assert summary["calibration"] == stored and stored["labels"] == ["neg", "pos"]
    assert stored["tuned_for"] == "macro_f1" and stored["biases"][0] == 0.0 and stored["thresholds"] is None
    assert 0.0 < stored["binary_threshold"] < 1.0
    assert (stored["temperature"] is not None) == calibrate
    test = summary["eval"]["test"]
    # the test split reported with the default rule (top level) and with the tuned biases (`tuned`)
    assert {"accuracy", "macro_f1", "micro_f1", "ece", "nll", "tuned"} <= test.keys()
    assert ("calibrated" in test) == calibrate
    if calibrate:
        # the temperature minimises the validation NLL, so it cannot make it worse
        val = summary["eval"]["validation"]
        assert (
            val["calibrated"]["nll"] <= val["nll"] + 1e-9
            and val["calibrated"]["temperature"] == stored["temperature"]
        )

    rows = [json.loads(line) for line in (toy_data / "test.jsonl").read_text().splitlines()]
    predicted = predict_file(out / "adapter", toy_data / "test.jsonl", tmp_path)
    gold = np.array([["neg", "pos"].index(r["label"]) for r in rows])
    pred = np.array([["neg", "pos"].index(p["label"]) for p in predicted])
    again = classification_metrics(pred, gold, ["neg", "pos"])
    assert again["accuracy"] == pytest.approx(test["tuned"]["accuracy"], abs=1e-12)
    assert again["macro_f1"] == pytest.approx(test["tuned"]["macro_f1"], abs=1e-12)
    # probabilities: softmax(logits / T) of the reloaded adapter (raw softmax with eval.calibrate=false)
    logits = raw_logits(out / "adapter", [r["text"] for r in rows])
    expected = softmax(logits / (stored["temperature"] or 1.0))
    got = np.array([[p["probs"]["neg"], p["probs"]["pos"]] for p in predicted])
    np.testing.assert_allclose(got, expected, atol=2e-6)
    # the label follows the stored threshold on p(pos), not the argmax (the rule itself: test_binary_* above).
    # The tuned threshold lies between two validation scores, which for the tiny model can be within 1e-6
    # of each other, so rows closer to it than two forward passes (batched differently) agree are left out
    threshold = stored["binary_threshold"]
    decided = [
        (p["label"], "pos" if q >= threshold else "neg")
        for p, q in zip(predicted, expected[:, 1])
        if abs(q - threshold) > 2e-6
    ]
    assert len(decided) >= 30, f"only {len(decided)} of 40 test rows lie clear of the threshold"
    # a plain argmax (p(pos) >= 0.5) labels some clear rows otherwise, else the check below cannot tell the
    # tuned rule from the default one (a threshold of 0.5, or none between it and the scores)
    between = [q for q in expected[:, 1] if abs(q - threshold) > 2e-6 and (q >= threshold) != (q >= 0.5)]
    assert between, f"no clear test row lies between the tuned threshold {threshold} and 0.5"
    assert {rule for _, rule in decided} == {"neg", "pos"}, "the threshold put every clear row on one side"
    assert all(label == rule for label, rule in decided)
