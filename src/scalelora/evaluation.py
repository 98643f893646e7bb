"""Metrics (accuracy, macro-F1, per-class report, confusion matrix, calibration) and gathered prediction."""

from __future__ import annotations

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


@torch.inference_mode()
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
    accelerator: Any, model: torch.nn.Module, loader: Any, label_names: list[str]
) -> dict[str, Any]:
    probs, labels, idx = gather_predictions(accelerator, model, loader)
    metrics = classification_metrics(probs.argmax(axis=1), labels, label_names, probs)
    metrics["unique_examples"] = int(len(np.unique(idx)))
    return metrics
