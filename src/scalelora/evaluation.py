"""Metrics (accuracy, macro-F1, per-class report, confusion matrix, calibration) and gathered prediction.

The built-in metrics come from scikit-learn: they need no download and run no code but the library's.
scikit-learn is imported at the first evaluation, not with the trainer (it costs about 37 MiB of resident
memory and most of a second of start-up).
Users add metrics of the `evaluate` library by name (`eval.extra_metrics`): hub modules or local
folders/scripts, which are Python code, hence `eval.trust_remote_code`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scalelora import longtext
from scalelora.calibration import (
    MULTI_LABEL,
    SINGLE_LABEL,
    Calibration,
    fit_calibration,
    negative_log_likelihood,
    probabilities,
)
from scalelora.files import atomic_write_text

CALIBRATION_BINS = 15


def _per_class(label_names: list[str], precision: Any, recall: Any, f1: Any, support: Any) -> dict[str, Any]:
    return {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(label_names)
    }


def classification_metrics(
    predictions: np.ndarray, labels: np.ndarray, label_names: list[str], probs: np.ndarray | None = None
) -> dict[str, Any]:
    """Accuracy, macro-F1, micro-F1, per-class precision/recall/f1/support and the confusion matrix (rows: gold)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    ids = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=ids, zero_division=0
    )
    metrics: dict[str, Any] = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, labels=ids, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(labels, predictions, labels=ids, average="micro", zero_division=0)),
        "num_examples": int(len(labels)),
        "per_class": _per_class(label_names, precision, recall, f1, support),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=ids).tolist(),
    }
    if probs is not None:
        metrics["ece"] = expected_calibration_error(probs, labels)
    return metrics


def multi_label_metrics(
    predictions: np.ndarray, labels: np.ndarray, label_names: list[str], probs: np.ndarray | None = None
) -> dict[str, Any]:
    """For N x K 0/1 `predictions` and `labels`: `accuracy` is the subset accuracy (every label of the
    row right), macro-F1 the mean of the per-label F1s, micro-F1 pooled over all label decisions;
    per-label precision/recall/f1/support and `confusion_per_label` ({label: tp, fp, fn, tn})."""
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        multilabel_confusion_matrix,
        precision_recall_fscore_support,
    )

    predictions = np.asarray(predictions, dtype=np.int64)
    labels = np.asarray(labels).astype(np.int64)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, average=None, zero_division=0
    )
    confusion = multilabel_confusion_matrix(labels, predictions)  # per label [[tn, fp], [fn, tp]]
    metrics: dict[str, Any] = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(labels, predictions, average="micro", zero_division=0)),
        "num_examples": int(len(labels)),
        "per_class": _per_class(label_names, precision, recall, f1, support),
        "confusion_per_label": {
            name: {"tp": int(m[1, 1]), "fp": int(m[0, 1]), "fn": int(m[1, 0]), "tn": int(m[0, 0])}
            for name, m in zip(label_names, confusion)
        },
    }
    if probs is not None:
        metrics["ece"] = multi_label_calibration_error(probs, labels)
    return metrics


def decision_metrics(
    predictions: np.ndarray, labels: np.ndarray, label_names: list[str], problem_type: str, probs: Any = None
) -> dict[str, Any]:
    metric_fn = multi_label_metrics if problem_type == MULTI_LABEL else classification_metrics
    return metric_fn(predictions, labels, label_names, probs)


def reliability_bins(
    confidence: np.ndarray, outcome: np.ndarray, bins: int = CALIBRATION_BINS
) -> dict[str, list[float]]:
    """Equal-width confidence bins: mean confidence, observed frequency and count of each non-empty bin."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    outcome = np.asarray(outcome, dtype=np.float64).ravel()
    edges = np.linspace(0.0, 1.0, bins + 1)
    out: dict[str, list[float]] = {"confidence": [], "frequency": [], "count": []}
    for low, high in zip(edges[:-1], edges[1:]):
        # (low, high], with 0 itself in the first bin
        in_bin = (confidence > low) & (confidence <= high) if low > 0 else (confidence <= high)
        if in_bin.any():
            out["confidence"].append(float(confidence[in_bin].mean()))
            out["frequency"].append(float(outcome[in_bin].mean()))
            out["count"].append(int(in_bin.sum()))
    return out


def _ece(bins: dict[str, list[float]]) -> float:
    total = sum(bins["count"])
    return float(
        sum(n / total * abs(f - c) for n, f, c in zip(bins["count"], bins["frequency"], bins["confidence"]))
    )


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Top-label ECE with equal-width confidence bins."""
    return _ece(reliability(probs, labels, SINGLE_LABEL, bins))


def multi_label_calibration_error(
    probs: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS
) -> float:
    """ECE of every per-label probability against its 0/1 outcome (all example x label pairs pooled)."""
    return _ece(reliability(probs, labels, MULTI_LABEL, bins))


def reliability(
    probs: np.ndarray, labels: np.ndarray, problem_type: str, bins: int = CALIBRATION_BINS
) -> dict[str, list[float]]:
    """The reliability diagram's bins: top-label confidence against accuracy (single-label), or every
    per-label probability against how often that label is present (multi-label)."""
    probs = np.asarray(probs)
    if problem_type == MULTI_LABEL:
        return reliability_bins(probs, labels, bins)
    return reliability_bins(probs.max(axis=1), probs.argmax(axis=1) == np.asarray(labels), bins)


@dataclass
class SplitOutputs:
    """A whole split's logits, gold labels and example ids, gathered from every rank."""

    logits: np.ndarray
    labels: np.ndarray
    idx: np.ndarray


# no_grad, not inference_mode: under ZeRO-3 a forward gathers parameters, and gathered under
# inference_mode they stay inference tensors that the next training step cannot use
@torch.no_grad()
def gather_logits(accelerator: Any, model: torch.nn.Module, loader: Any, pool: str = "mean") -> SplitOutputs:
    """Run `model` over a prepared loader on every rank; return the whole split's logits (float32).

    `gather_for_metrics` drops the samples Accelerate duplicated to even out the last batch. A chunked
    batch (data.long_text=chunk) gets one row per document, its windows' logits pooled as `pool` says.
    """
    model.eval()
    all_logits, all_labels, all_idx = [], [], []
    bar = None
    if accelerator.is_main_process and sys.stderr.isatty():  # a terminal sees the evaluation advance
        from tqdm.auto import tqdm

        total = len(loader) if hasattr(loader, "__len__") else None
        bar = tqdm(total=total, desc="scalelora: evaluate", unit="batch", leave=False)
    for batch in loader:
        labels = batch.pop("labels")
        idx = batch.pop("idx")
        doc = batch.pop(longtext.DOC, None)
        logits = model(**batch).logits.float()
        if doc is not None:
            logits = longtext.pool_logits(logits, doc, labels.shape[0], pool)
        logits, labels, idx = accelerator.gather_for_metrics((logits, labels, idx))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
        all_idx.append(idx.cpu())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return SplitOutputs(
        torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy(), torch.cat(all_idx).numpy()
    )


def split_metrics(
    outputs: SplitOutputs,
    label_names: list[str],
    problem_type: str = SINGLE_LABEL,
    calibration: Calibration | None = None,
    extra_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every metric of one split.

    The top-level keys use the raw probabilities and the default rule (argmax; p >= 0.5 per label):
    accuracy, macro_f1, micro_f1, per-class, confusion, `ece` and `nll` (mean negative log-likelihood),
    `reliability` (the diagram's bins). With a temperature in `calibration`, `calibrated` holds
    {temperature, ece, nll, reliability} of the calibrated probabilities; with a tuned rule, `tuned`
    holds the decision metrics of that rule (and what it was tuned for).
    """
    logits, labels = outputs.logits, outputs.labels
    probs = probabilities(logits, problem_type)
    if problem_type == MULTI_LABEL:
        predictions = (logits >= 0).astype(np.int64)  # sigmoid(z) >= 0.5
    else:
        predictions = logits.argmax(axis=1)
    metrics = decision_metrics(predictions, labels, label_names, problem_type, probs)
    metrics["nll"] = negative_log_likelihood(logits, labels, problem_type)
    metrics["reliability"] = reliability(probs, labels, problem_type)
    metrics["unique_examples"] = int(len(np.unique(outputs.idx)))
    if calibration is not None and calibration.temperature is not None:
        calibrated = calibration.probabilities(logits)
        bins = reliability(calibrated, labels, problem_type)
        metrics["calibrated"] = {
            "temperature": calibration.temperature,
            "ece": _ece(bins),
            "nll": negative_log_likelihood(calibration.scaled(logits), labels, problem_type),
            "reliability": bins,
        }
    if calibration is not None and calibration.tuned:
        tuned = decision_metrics(calibration.decide(logits), labels, label_names, problem_type)
        tuned.pop("num_examples")
        metrics["tuned"] = {"tuned_for": calibration.tuned_for, **tuned}
    add_extra_metrics(metrics, extra_metrics or {}, predictions, labels)
    return metrics


def evaluate_split(
    accelerator: Any,
    model: torch.nn.Module,
    loader: Any,
    label_names: list[str],
    extra_metrics: dict[str, Any] | None = None,
    predictions_path: Path | None = None,
    problem_type: str = SINGLE_LABEL,
    calibration: Calibration | None = None,
    tune: str | None = None,
    pool: str = "mean",
) -> tuple[dict[str, Any], SplitOutputs]:
    """Gather the split and compute `split_metrics`; returns (metrics, outputs). With `predictions_path`
    the main process also writes one JSON line per example there (see `write_predictions`).

    `tune` (a metric name) tunes a decision rule on this very split first (no temperature), as the
    evaluations during training do to pick the best checkpoint by the rule the model will use. `pool`:
    data.chunk_pool, for chunked batches.
    """
    outputs = gather_logits(accelerator, model, loader, pool)
    if tune and calibration is None:
        calibration = fit_calibration(problem_type, outputs.logits, outputs.labels, label_names, False, tune)
    metrics = split_metrics(outputs, label_names, problem_type, calibration, extra_metrics)
    if predictions_path is not None and accelerator.is_main_process:
        write_predictions(predictions_path, outputs, label_names, problem_type, calibration)
    return metrics, outputs


def write_predictions(
    path: Path,
    outputs: SplitOutputs,
    label_names: list[str],
    problem_type: str = SINGLE_LABEL,
    calibration: Calibration | None = None,
) -> None:
    """`{"idx", "label", "predicted", "probs"}` per example, in example-id order (ids are row numbers
    of the split file), written atomically. `predicted` and `probs` are the raw model's (argmax; p >= 0.5
    per label for multi-label, where `label` and `predicted` are lists of names); with a tuned decision
    rule, `tuned` is its prediction (what `predict` prints)."""
    multi = problem_type == MULTI_LABEL
    probs = probabilities(outputs.logits, problem_type)

    def names(row: np.ndarray) -> list[str]:
        return [label_names[k] for k in np.flatnonzero(row)]

    default = (outputs.logits >= 0).astype(np.int64) if multi else probs.argmax(axis=1)
    tuned = calibration.decide(outputs.logits) if calibration is not None and calibration.tuned else None
    lines = []
    for row in np.argsort(outputs.idx, kind="stable"):
        gold = outputs.labels[row]
        record: dict[str, Any] = {
            "idx": int(outputs.idx[row]),
            "label": names(gold) if multi else label_names[int(gold)],
            "predicted": names(default[row]) if multi else label_names[int(default[row])],
            "probs": [round(float(p), 5) for p in probs[row]],
        }
        if tuned is not None:
            record["tuned"] = names(tuned[row]) if multi else label_names[int(tuned[row])]
        lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def metric_name(name: str) -> str:
    """How an `eval.extra_metrics` entry is called in outputs: a hub name's last part, a path's stem."""
    return Path(name.rstrip("/")).stem if ("/" in name or name.endswith(".py")) else name


def load_extra_metrics(names: list[str], trusted: bool) -> dict[str, Any]:
    """Load `evaluate` modules (hub names, local folders or .py files) once, before training.

    Raises ConfigError when code may not run (`eval.trust_remote_code` false) or a module does not load.
    """
    from scalelora.errors import ConfigError, one_line

    if not names:
        return {}
    if not trusted:
        raise ConfigError(
            f"eval.extra_metrics={','.join(names)}: evaluate modules are Python code that scalelora runs; "
            "set eval.trust_remote_code=true if you trust them, or drop eval.extra_metrics"
        )
    import evaluate

    modules = {}
    for name in names:
        try:
            modules[metric_name(name)] = evaluate.load(name)
        except Exception as err:  # evaluate raises many types for a missing or broken module
            raise ConfigError(
                f"eval.extra_metrics: cannot load {name!r} ({one_line(err, 160)}); give an evaluate module's "
                "hub name (needs internet) or a local folder or .py file holding one"
            ) from None
    return modules


def add_extra_metrics(
    metrics: dict[str, Any], modules: dict[str, Any], predictions: np.ndarray, labels: np.ndarray
) -> None:
    """Add each module's results to `metrics` (a key a built-in metric already has gets `<module>/`),
    and list the added keys under `extra_metrics`. Raises UserError when a module's compute fails."""
    from scalelora.errors import UserError, one_line

    added = []
    for name, module in modules.items():
        try:
            result = module.compute(predictions=predictions.tolist(), references=labels.tolist())
        except Exception as err:  # a user's module can raise anything
            raise UserError(
                f"eval.extra_metrics: {name} failed on this split ({one_line(err, 160)}); fix or drop it"
            ) from None
        for key, value in (result or {}).items():
            out_key = key if key not in metrics else f"{name}/{key}"
            metrics[out_key] = value.tolist() if hasattr(value, "tolist") else value
            added.append(out_key)
    if modules:
        metrics["extra_metrics"] = added
