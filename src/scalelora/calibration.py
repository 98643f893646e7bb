"""Post-hoc calibration and decision rules, fitted on the validation split after training.

- Temperature scaling (Guo et al. 2017): one T > 0 for all classes, logits / T, with T minimising the
  negative log-likelihood of the validation split (LBFGS on log T). It changes the probabilities,
  never the ranking: argmax and every per-label order stay as they were.
- Decision rules tuned for a metric (macro- or micro-F1) on the validation split: per-label thresholds
  on the (calibrated) sigmoid probabilities for multi-label; per-class additive biases on the
  (calibrated) logits for single-label, `argmax(z / T + b)`, which for two classes is one threshold
  on p(second label).

Everything here is a pure function of numpy arrays. The fitted `Calibration` is stored beside the
model as `calibration.json` and read back by `predict` and `export`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from scalelora.errors import CalibrationError

CALIBRATION_FILE = "calibration.json"
FORMAT_VERSION = 1
SINGLE_LABEL, MULTI_LABEL = "single_label", "multi_label"
DEFAULT_THRESHOLD = 0.5
# A validation split the model separates perfectly drives the NLL-optimal T towards 0; keep it sane.
TEMPERATURE_BOUNDS = (0.05, 100.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def probabilities(logits: np.ndarray, problem_type: str) -> np.ndarray:
    """Softmax over classes (single-label) or one sigmoid per label (multi-label)."""
    logits = np.asarray(logits, dtype=np.float64)
    return sigmoid(logits) if problem_type == MULTI_LABEL else softmax(logits)


def _nll_torch(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    if problem_type == MULTI_LABEL:
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / len(labels)
    return F.cross_entropy(logits, labels, reduction="mean")


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, problem_type: str) -> float:
    """Mean over examples of -log p(gold): cross-entropy (single-label), or binary cross-entropy summed
    over labels (multi-label: the training loss without weights)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(
        np.asarray(labels), dtype=torch.float64 if problem_type == MULTI_LABEL else torch.long
    )
    return float(_nll_torch(z, y, problem_type))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, problem_type: str) -> float:
    """The T minimising the NLL of `logits / T` (LBFGS on log T, from T = 1), within TEMPERATURE_BOUNDS."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(
        np.asarray(labels), dtype=torch.float64 if problem_type == MULTI_LABEL else torch.long
    )
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _nll_torch(z / log_t.exp(), y, problem_type)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    return min(max(t, TEMPERATURE_BOUNDS[0]), TEMPERATURE_BOUNDS[1])


# --- multi-label thresholds ------------------------------------------------------------------------


def _cut_points(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one label: (thresholds, true positives, predicted positives) of every distinct decision.

    Sorting the probabilities in decreasing order, a threshold between two neighbouring distinct values
    predicts the ones above it; the first entry (threshold above the largest value) predicts none.
    """
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    tp = np.concatenate([[0.0], np.cumsum(ys)])
    predicted = np.arange(len(ps) + 1, dtype=np.float64)
    upper = np.concatenate([[1.0], ps])
    lower = np.concatenate([ps, [0.0]])
    distinct = upper > lower  # a cut between equal values is not a decision
    distinct[0] = True
    thresholds = (upper + lower) / 2
    return thresholds[distinct], tp[distinct], predicted[distinct]


def _pick(scores: np.ndarray, thresholds: np.ndarray) -> int:
    """The best score; among equal ones, the threshold closest to 0.5 (the untuned rule)."""
    best = scores.max()
    tied = np.flatnonzero(scores >= best - 1e-12)
    return int(tied[np.argmin(np.abs(thresholds[tied] - DEFAULT_THRESHOLD))])


def tune_thresholds(
    probs: np.ndarray, labels: np.ndarray, metric: str = "macro_f1", passes: int = 3
) -> list[float]:
    """Per-label thresholds on `probs` (N x K) that maximise `metric` on (probs, labels).

    macro_f1: each label's F1 on its own (macro-F1 is their mean, so this is its optimum over all
    thresholds). micro_f1: coordinate ascent over labels from 0.5, `passes` rounds. A label with no
    positive example keeps 0.5 (no threshold can be chosen for it).
    """
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    k = probs.shape[1]
    thresholds = np.full(k, DEFAULT_THRESHOLD)
    cuts = [_cut_points(probs[:, j], labels[:, j]) for j in range(k)]
    positives = labels.sum(axis=0)
    if metric == "macro_f1":
        for j, (thr, tp, pred) in enumerate(cuts):
            if positives[j] > 0:
                thresholds[j] = thr[_pick(2 * tp / (pred + positives[j]), thr)]
        return thresholds.tolist()
    if metric != "micro_f1":
        raise ValueError(f"unknown metric {metric}")
    for _ in range(passes):
        decided = probs >= thresholds
        tp_all = (decided * labels).sum(axis=0)
        pred_all = decided.sum(axis=0)
        changed = False
        for j, (thr, tp, pred) in enumerate(cuts):
            if positives[j] == 0:
                continue
            tp_rest = tp_all.sum() - tp_all[j]
            pred_rest = pred_all.sum() - pred_all[j]
            pos_total = positives.sum()
            # micro-F1 = 2 TP / (predicted + positives), over all labels
            scores = 2 * (tp_rest + tp) / (pred_rest + pred + pos_total)
            choice = thr[_pick(scores, thr)]
            if choice != thresholds[j]:
                changed = True
                thresholds[j] = choice
                column = probs[:, j] >= choice
                tp_all[j], pred_all[j] = (column * labels[:, j]).sum(), column.sum()
        if not changed:
            break
    return thresholds.tolist()


# --- single-label biases ---------------------------------------------------------------------------


def _f1_scores(pred: np.ndarray, gold: np.ndarray, k: int) -> tuple[float, float]:
    """(macro-F1 over all k classes, micro-F1 = accuracy) as scikit-learn computes them (zero_division=0)."""
    tp = np.bincount(gold[pred == gold], minlength=k).astype(np.float64)
    fp = np.bincount(pred, minlength=k) - tp
    fn = np.bincount(gold, minlength=k) - tp
    denominator = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros(k), where=denominator > 0)
    return float(f1.mean()), float(tp.sum() / max(len(gold), 1))


def _binary_bias(switch: np.ndarray, gold: np.ndarray, which: int) -> tuple[float, float]:
    """Two classes: (best score, bias) over every distinct cut of `switch` (class 1 wins iff b > switch),
    in O(N log N): sorting the switch points, a cut after the j smallest predicts class 1 for those j."""
    order = np.argsort(switch, kind="stable")
    d, positive = switch[order], gold[order] == 1
    n, p1 = len(d), positive.sum()
    tp1 = np.concatenate([[0], np.cumsum(positive)])  # class-1 hits among the j predicted 1
    pred1 = np.arange(n + 1)
    tn = (n - p1) - (pred1 - tp1)  # class-0 hits among the n - j predicted 0
    if which == 0:
        f1_1 = np.divide(2 * tp1, pred1 + p1, out=np.zeros(n + 1), where=pred1 + p1 > 0)
        f1_0 = np.divide(
            2 * tn, (n - pred1) + (n - p1), out=np.zeros(n + 1), where=(n - pred1) + (n - p1) > 0
        )
        scores = (f1_0 + f1_1) / 2
    else:
        scores = (tp1 + tn) / n
    # the value of each cut: below every point (j = 0), between neighbours, above every point (j = n)
    values = np.concatenate([[d[0] - 1.0], (d[:-1] + d[1:]) / 2, [d[-1] + 1.0]])
    distinct = np.concatenate([[True], d[:-1] < d[1:], [True]])  # no cut between equal switch points
    scores = np.where(distinct, scores, -np.inf)
    j = int(np.argmax(scores))
    return float(scores[j]), float(values[j])


def tune_biases(
    logits: np.ndarray, labels: np.ndarray, metric: str = "macro_f1", passes: int = 3, candidates: int = 200
) -> list[float]:
    """Additive per-class biases b (b_0 = 0) so that argmax(logits + b) maximises `metric` on `labels`.

    For class k the prediction switches to k exactly when b_k exceeds max_{j != k}(z_j + b_j) - z_k,
    so the candidate values are those switch points. Two classes: every switch point, an exact search
    for the best threshold (`_binary_bias`). More: coordinate search over the classes, `candidates`
    quantiles of the switch points each, `passes` rounds; a change is kept only when it improves the
    metric, so the result is never worse than the plain argmax.
    """
    z = np.asarray(logits, dtype=np.float64)
    gold = np.asarray(labels, dtype=np.int64)
    k = z.shape[1]
    if metric not in ("macro_f1", "micro_f1"):
        raise ValueError(f"unknown metric {metric}")
    which = 0 if metric == "macro_f1" else 1
    biases = np.zeros(k)
    best = _f1_scores(z.argmax(axis=1), gold, k)[which]
    if k == 2:
        score, value = _binary_bias(z[:, 0] - z[:, 1], gold, which)
        if score > best + 1e-12:
            biases[1] = value
        return biases.tolist()
    for _ in range(passes):
        improved = False
        for c in range(1, k):
            others = z + biases
            others[:, c] = -np.inf
            alternative = others.argmax(axis=1)
            switch = others.max(axis=1) - z[:, c]  # class c wins iff b_c > switch
            points = np.unique(switch)
            if len(points) > candidates:
                points = np.unique(np.quantile(points, np.linspace(0, 1, candidates)))
            # just above each switch point (c wins there), and below all of them (c never wins)
            values = np.concatenate([[points[0] - 1.0], (points[:-1] + points[1:]) / 2, [points[-1] + 1.0]])
            for value in values:
                pred = np.where(value > switch, c, alternative)
                score = _f1_scores(pred, gold, k)[which]
                if score > best + 1e-12:
                    best, biases[c], improved = score, value, True
        if not improved:
            break
    return biases.tolist()


# --- the fitted object and its file ---------------------------------------------------------------


@dataclass
class Calibration:
    """What is stored beside a model (calibration.json): its temperature and its tuned decision rule."""

    problem_type: str
    labels: list[str]
    temperature: float | None = None
    """None: raw probabilities (eval.calibrate=false)."""
    thresholds: list[float] | None = None
    """Multi-label: label k is predicted when its calibrated probability is >= thresholds[k] (None: 0.5)."""
    biases: list[float] | None = None
    """Single-label: the prediction is argmax(logits / T + biases) (None: zeros, the plain argmax)."""
    tuned_for: str | None = None
    temperature_in_weights: bool = False
    """True in a merged export, whose head already divides its logits by `temperature`."""
    fitted_on: dict[str, Any] = field(default_factory=dict)

    @property
    def multi_label(self) -> bool:
        return self.problem_type == MULTI_LABEL

    @property
    def binary_threshold(self) -> float | None:
        """Two classes with biases: the threshold on p(labels[1]) the biases amount to."""
        if self.multi_label or self.biases is None or len(self.labels) != 2:
            return None
        return 1.0 / (1.0 + math.exp(self.biases[1] - self.biases[0]))

    def scaled(self, logits: np.ndarray) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64)
        if self.temperature is None or self.temperature_in_weights:
            return z
        return z / self.temperature

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return probabilities(self.scaled(logits), self.problem_type)

    def decide(self, logits: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """Predicted class ids (single-label) or an N x K 0/1 matrix (multi-label); `threshold`
        replaces every tuned multi-label threshold."""
        z = self.scaled(logits)
        if self.multi_label:
            cut = threshold if threshold is not None else np.asarray(self.thresholds or DEFAULT_THRESHOLD)
            return (sigmoid(z) >= cut).astype(np.int64)
        return (z + np.asarray(self.biases if self.biases is not None else 0.0)).argmax(axis=1)

    @property
    def tuned(self) -> bool:
        return self.thresholds is not None or self.biases is not None

    def to_json(self) -> dict[str, Any]:
        data = {"format": FORMAT_VERSION, **asdict(self)}
        data["binary_threshold"] = self.binary_threshold
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> Calibration:
        """Raises CalibrationError for a file that is not a calibration of this format."""
        if not isinstance(data, dict) or data.get("problem_type") not in (SINGLE_LABEL, MULTI_LABEL):
            raise CalibrationError(f"{where}: not a scalelora calibration file; delete it or retrain")
        known = {f for f in cls.__dataclass_fields__}
        try:
            calibration = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise CalibrationError(f"{where}: not a scalelora calibration file ({err})") from None
        calibration.check(where)
        return calibration

    def check(self, where: str, labels: list[str] | None = None) -> None:
        """Raise CalibrationError unless the values fit `labels` (the model's) and are in range."""
        if labels is not None and list(labels) != list(self.labels):
            raise CalibrationError(
                f"{where} is for labels {self.labels}, but the model has {list(labels)}; delete it (the model "
                "then predicts with raw probabilities and the default rule) or retrain to fit a new one"
            )
        if self.temperature is not None and not (
            isinstance(self.temperature, (int, float))
            and math.isfinite(self.temperature)
            and self.temperature > 0
        ):
            raise CalibrationError(
                f"{where}: temperature must be a positive number, got {self.temperature!r}"
            )
        for name, values, low, high in (
            ("thresholds", self.thresholds, 0.0, 1.0),
            ("biases", self.biases, -math.inf, math.inf),
        ):
            if values is None:
                continue
            if (name == "thresholds") != self.multi_label:
                raise CalibrationError(f"{where}: {name} do not apply to a {self.problem_type} model")
            if not isinstance(values, list) or len(values) != len(self.labels):
                got = len(values) if isinstance(values, list) else values
                raise CalibrationError(
                    f"{where}: {len(self.labels)} labels but {got} {name}; one per label, in label order"
                )
            bad = [
                v
                for v in values
                if not isinstance(v, (int, float)) or not (low <= v <= high) or math.isnan(v)
            ]
            if bad:
                raise CalibrationError(f"{where}: {name} must be numbers in [{low}, {high}], got {bad[:3]}")


def fit_calibration(
    problem_type: str,
    logits: np.ndarray,
    labels: np.ndarray,
    label_names: list[str],
    calibrate: bool,
    tune: str | None,
    split: str = "validation",
) -> Calibration:
    """Fit the temperature (when `calibrate`) and then the decision rule for `tune` (None: none) on
    the calibrated outputs of one split."""
    temperature = fit_temperature(logits, labels, problem_type) if calibrate else None
    result = Calibration(
        problem_type,
        list(label_names),
        temperature=temperature,
        tuned_for=tune,
        fitted_on={"split": split, "num_examples": int(len(labels))},
    )
    if tune:
        scaled = result.scaled(logits)
        if problem_type == MULTI_LABEL:
            result.thresholds = tune_thresholds(sigmoid(scaled), labels, tune)
        else:
            result.biases = tune_biases(scaled, labels, tune)
    return result


def read_calibration(folder: Path, labels: list[str]) -> Calibration | None:
    """The calibration stored in `folder` (None when there is none), checked against the model's
    labels. Raises CalibrationError for an unreadable file or one for other labels."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CalibrationError(f"{path}: not valid JSON ({err}); delete it or retrain") from None
    calibration = Calibration.from_json(data, str(path))
    calibration.check(str(path), labels)
    return calibration
