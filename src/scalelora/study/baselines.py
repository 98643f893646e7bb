"""Classical baselines for the results table (scikit-learn): TF-IDF + logistic regression, and a
linear probe (logistic regression on frozen, mean-pooled encoder features).

Both pick the regularisation strength C on the validation split (macro-F1) from a small grid,
refit nothing else, and report the same metrics as the trainer. On multi-label data both are
one-vs-rest (one binary logistic regression per label) with per-label decision thresholds tuned on
the validation split for macro-F1, as the trainer tunes its own (`calibration.tune_thresholds`);
C is picked by the tuned validation macro-F1.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from scalelora.calibration import tune_thresholds
from scalelora.data import MULTI_LABEL, Splits
from scalelora.evaluation import classification_metrics, multi_label_metrics

C_GRID = (0.5, 2.0, 8.0)


def lr_params(features: int, num_labels: int, problem_type: str = "single_label") -> int:
    """Weights of a fitted scikit-learn LogisticRegression: one row (binary) or one per class, plus biases
    (multi-label one-vs-rest: one row per label)."""
    rows = 1 if num_labels == 2 and problem_type != MULTI_LABEL else num_labels
    return features * rows + rows


def short_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The row's numbers: accuracy and macro-F1 (and micro-F1, `tuned` when the metrics have them)."""
    out = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
    if "micro_f1" in metrics:
        out["micro_f1"] = metrics["micro_f1"]
    if "tuned" in metrics:
        out["tuned"] = {k: metrics["tuned"][k] for k in ("accuracy", "macro_f1", "micro_f1")}
    return out


def fit_ovr_logreg(
    train_x: Any,
    train_y: np.ndarray,
    evals: dict[str, tuple[Any, np.ndarray]],
    label_names: list[str],
    grid: tuple[float, ...] = C_GRID,
) -> tuple[dict[str, Any], float, dict[str, np.ndarray], list[float]]:
    """Multi-label: one-vs-rest logistic regression for each C, per-label thresholds tuned on
    `evals['validation']` for macro-F1, the C with the best tuned validation macro-F1 kept.

    Returns (metrics per split: at p >= 0.5, with `tuned` at the tuned thresholds; C; the 0/1
    predictions per split at the tuned thresholds; the thresholds).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    val_x, val_y = evals["validation"]
    best: tuple[float, Any, float, list[float]] | None = None
    for c in grid:
        clf = OneVsRestClassifier(LogisticRegression(C=c, max_iter=2000)).fit(train_x, train_y)
        probs = clf.predict_proba(val_x)
        thresholds = tune_thresholds(probs, val_y, "macro_f1")
        f1 = multi_label_metrics((probs >= thresholds).astype(int), val_y, label_names)["macro_f1"]
        if best is None or f1 > best[0]:
            best = (f1, clf, c, thresholds)
    assert best is not None
    _, clf, c, thresholds = best
    metrics, predictions = {}, {}
    for split, (x, y) in evals.items():
        probs = clf.predict_proba(x)
        predictions[split] = (probs >= thresholds).astype(int)
        metrics[split] = multi_label_metrics((probs >= 0.5).astype(int), y, label_names, probs)
        metrics[split]["tuned"] = multi_label_metrics(predictions[split], y, label_names)
    return metrics, c, predictions, thresholds


def fit_logreg(
    train_x: Any,
    train_y: np.ndarray,
    evals: dict[str, tuple[Any, np.ndarray]],
    label_names: list[str],
    grid: tuple[float, ...] = C_GRID,
) -> tuple[dict[str, Any], float, dict[str, np.ndarray]]:
    """Fit LR for each C, keep the best on `evals['validation']`; returns (metrics per split, C,
    predicted label ids per split)."""
    from sklearn.linear_model import LogisticRegression

    best: tuple[float, Any, float] | None = None
    for c in grid:
        clf = LogisticRegression(C=c, max_iter=2000)
        clf.fit(train_x, train_y)
        val_x, val_y = evals["validation"]
        f1 = classification_metrics(clf.predict(val_x), val_y, label_names)["macro_f1"]
        if best is None or f1 > best[0]:
            best = (f1, clf, c)
    assert best is not None
    _, clf, c = best
    predictions = {split: clf.predict(x) for split, (x, _) in evals.items()}
    metrics = {
        split: classification_metrics(predictions[split], y, label_names) for split, (_, y) in evals.items()
    }
    return metrics, c, predictions


def predictions_on_test(predictions: dict[str, np.ndarray], splits: Splits) -> list[Any] | None:
    """Predicted label names on the test split in example-id order, as the trainer writes them (None
    without a test split); multi-label: the list of predicted names of each example."""
    if "test" not in predictions or splits.test is None:
        return None
    order = np.argsort(np.asarray(splits.test["idx"]), kind="stable")
    names = splits.label_names
    if splits.problem_type == MULTI_LABEL:
        return [[names[k] for k in np.flatnonzero(predictions["test"][i])] for i in order]
    return [names[int(predictions["test"][i])] for i in order]


def fit_classifier(
    splits: Splits, train_x: Any, train_y: np.ndarray, evals: dict[str, tuple[Any, np.ndarray]]
) -> tuple[dict[str, Any], float, dict[str, np.ndarray], dict[str, Any]]:
    """`fit_logreg`, or `fit_ovr_logreg` on multi-label data; returns (metrics, C, predictions, details)."""
    if splits.problem_type == MULTI_LABEL:
        metrics, c, predicted, thresholds = fit_ovr_logreg(train_x, train_y, evals, splits.label_names)
        return metrics, c, predicted, {"thresholds": dict(zip(splits.label_names, thresholds))}
    metrics, c, predicted = fit_logreg(train_x, train_y, evals, splits.label_names)
    return metrics, c, predicted, {}


def tfidf_logreg(splits: Splits, train_rows: Any = None, clean_html: bool = False) -> dict[str, Any]:
    """Word (1-2 gram) + char (2-5 gram, word-bounded) TF-IDF features and logistic regression.

    `train_rows` (a datasets.Dataset with `text` and `label`) replaces `splits.train`, e.g. to fit
    on the whole training split while the transformers use a subset. `clean_html`: the texts without
    markup, as `data.clean_html` gives them to the model.
    """
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    started = time.perf_counter()
    train = train_rows if train_rows is not None else splits.train
    word = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, max_features=200_000)
    char = TfidfVectorizer(
        analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2, max_features=300_000
    )
    texts = texts_of(train, clean_html)
    train_x = hstack([word.fit_transform(texts), char.fit_transform(texts)]).tocsr()

    def features(rows: Any) -> Any:
        t = texts_of(rows, clean_html)
        return hstack([word.transform(t), char.transform(t)]).tocsr()

    evals = {"validation": (features(splits.eval), np.asarray(splits.eval["label"]))}
    if splits.test is not None:
        evals["test"] = (features(splits.test), np.asarray(splits.test["label"]))
    metrics, c, predicted, details = fit_classifier(splits, train_x, np.asarray(train["label"]), evals)
    return {
        "predictions": predictions_on_test(predicted, splits),
        "trainable_params": lr_params(int(train_x.shape[1]), len(splits.label_names), splits.problem_type),
        "total_params": None,
        "eval": {split: short_metrics(m) for split, m in metrics.items()},
        "train_seconds": time.perf_counter() - started,
        "num_train_examples": len(train),
        "details": {"C": c, "features": int(train_x.shape[1]), **details},
    }


@torch.inference_mode()
def pooled_features(
    model: torch.nn.Module, tokenizer: Any, texts: list[str], max_length: int, batch_size: int = 128
) -> np.ndarray:
    """Mean-pooled last hidden states of a frozen encoder (the pooling sentence-transformers trains)."""
    from scalelora.teacher import mean_pool

    model.eval()
    order = np.argsort([len(t) for t in texts])  # similar lengths per batch: less padding
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        chunk = order[start : start + batch_size]
        encoded = tokenizer(
            [texts[i] for i in chunk],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        hidden = model(**encoded).last_hidden_state
        out[chunk] = mean_pool(hidden, encoded["attention_mask"]).float().numpy()
    return out


def texts_of(rows: Any, clean_html: bool) -> list[str]:
    """A split's texts as the transformer rows read them: `data.clean_html` applies to the baselines too."""
    from scalelora.longtext import LongText, prepare_texts

    return prepare_texts(rows["text"], LongText(clean_html=clean_html))


def linear_probe(
    splits: Splits, model_name: str, max_length: int, allow_pickle: bool = False, clean_html: bool = False
) -> dict[str, Any]:
    """Logistic regression on frozen mean-pooled features of `model_name` (the pretrained encoder)."""
    from transformers import AutoModel

    from scalelora.config import ModelConfig
    from scalelora.models import load_tokenizer, resolve_model_path

    started = time.perf_counter()
    tokenizer = load_tokenizer(ModelConfig(name=model_name))
    encoder = AutoModel.from_pretrained(
        resolve_model_path(model_name), use_safetensors=None if allow_pickle else True
    )
    total = sum(p.numel() for p in encoder.parameters())

    def feats(rows: Any) -> np.ndarray:
        return pooled_features(encoder, tokenizer, texts_of(rows, clean_html), max_length)

    train_x = feats(splits.train)
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    evals = {"validation": ((feats(splits.eval) - mean) / std, np.asarray(splits.eval["label"]))}
    if splits.test is not None:
        evals["test"] = ((feats(splits.test) - mean) / std, np.asarray(splits.test["label"]))
    metrics, c, predicted, details = fit_classifier(
        splits, (train_x - mean) / std, np.asarray(splits.train["label"]), evals
    )
    head = lr_params(int(encoder.config.hidden_size), len(splits.label_names), splits.problem_type)
    return {
        "predictions": predictions_on_test(predicted, splits),
        "trainable_params": int(head),
        "total_params": int(total + head),
        "eval": {split: short_metrics(m) for split, m in metrics.items()},
        "train_seconds": time.perf_counter() - started,
        "num_train_examples": len(splits.train),
        "details": {"C": c, "pooling": "mean", "features": int(encoder.config.hidden_size), **details},
    }
