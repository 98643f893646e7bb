"""Metrics (accuracy, macro-F1, per-class report, confusion matrix, calibration) and gathered prediction.

The built-in metrics come from scikit-learn: they need no download and run no code but the library's.
Users add metrics of the `evaluate` library by name (`eval.extra_metrics`): hub modules or local
folders/scripts, which are Python code, hence `eval.trust_remote_code`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(
    predictions: np.ndarray, labels: np.ndarray, label_names: list[str], probs: np.ndarray | None = None
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/f1/support and the confusion matrix (rows: gold)."""
    ids = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=ids, zero_division=0
    )
    metrics: dict[str, Any] = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, labels=ids, average="macro", zero_division=0)),
        "num_examples": int(len(labels)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": confusion_matrix(labels, predictions, labels=ids).tolist(),
    }
    if probs is not None:
        metrics["ece"] = expected_calibration_error(probs, labels)
    return metrics


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


# no_grad, not inference_mode: under ZeRO-3 a forward gathers parameters, and gathered under
# inference_mode they stay inference tensors that the next training step cannot use
@torch.no_grad()
def gather_predictions(
    accelerator: Any, model: torch.nn.Module, loader: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run `model` over a prepared loader on every rank; return (probs, labels, idx) of the whole split.

    `gather_for_metrics` drops the samples Accelerate duplicated to even out the last batch.
    """
    model.eval()
    all_probs, all_labels, all_idx = [], [], []
    for batch in loader:
        labels = batch.pop("labels")
        idx = batch.pop("idx")
        logits = model(**batch).logits
        probs = torch.softmax(logits.float(), dim=-1)
        probs, labels, idx = accelerator.gather_for_metrics((probs, labels, idx))
        all_probs.append(probs.cpu())
        all_labels.append(labels.cpu())
        all_idx.append(idx.cpu())
    return torch.cat(all_probs).numpy(), torch.cat(all_labels).numpy(), torch.cat(all_idx).numpy()


def evaluate_split(
    accelerator: Any,
    model: torch.nn.Module,
    loader: Any,
    label_names: list[str],
    extra_metrics: dict[str, Any] | None = None,
    predictions_path: Path | None = None,
) -> dict[str, Any]:
    """Metrics of `model` on a prepared loader, gathered from every rank; with `predictions_path` the
    main process also writes one JSON line per example there (see `write_predictions`)."""
    probs, labels, idx = gather_predictions(accelerator, model, loader)
    predictions = probs.argmax(axis=1)
    metrics = classification_metrics(predictions, labels, label_names, probs)
    metrics["unique_examples"] = int(len(np.unique(idx)))
    add_extra_metrics(metrics, extra_metrics or {}, predictions, labels)
    if predictions_path is not None and accelerator.is_main_process:
        write_predictions(predictions_path, probs, labels, idx, label_names)
    return metrics


def write_predictions(
    path: Path, probs: np.ndarray, labels: np.ndarray, idx: np.ndarray, label_names: list[str]
) -> None:
    """`{"idx", "label", "predicted", "probs"}` per example, in example-id order (ids are row numbers
    of the split file), written atomically."""
    from scalelora.checkpoint import atomic_write_text

    lines = []
    for row in np.argsort(idx, kind="stable"):
        lines.append(
            json.dumps(
                {
                    "idx": int(idx[row]),
                    "label": label_names[int(labels[row])],
                    "predicted": label_names[int(probs[row].argmax())],
                    "probs": [round(float(p), 5) for p in probs[row]],
                },
                ensure_ascii=False,
            )
        )
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
