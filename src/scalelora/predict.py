"""`python -m scalelora.predict --adapter DIR (--text "..." ... | --input FILE.jsonl) [--output FILE.jsonl]
[--threshold P] [--top-k K]`.

DIR is a run's `adapter/` (LoRA), its `model/` (full or head-only), a merged export, or the run
folder itself. Prints one JSON object per text: the text, the predicted `label` (single-label) or
`labels` (multi-label: every label whose probability reaches its threshold), and every label's
probability. The model folder's `calibration.json` (written by training) is applied: probabilities
are temperature-scaled and the decision rule is the one tuned on validation (per-label thresholds,
or per-class biases); without that file they are the raw probabilities and the default rule
(argmax; p >= 0.5 per label). A long text is treated as in training (`data.long_text` and
`data.clean_html`, recorded in the folder's `scalelora.json`): truncated, cut to its head and tail, or
scored window by window with the windows' logits pooled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from scalelora.calibration import MULTI_LABEL, SINGLE_LABEL, Calibration, read_calibration
from scalelora.errors import DataError, UnsafeWeightsError, UserError, exit_on_user_error
from scalelora.files import atomic_write_text
from scalelora.longtext import LongText, document_logits


def find_model_dir(path: Path) -> Path:
    if not path.is_dir():
        raise UserError(f"--adapter {path}: no such folder")
    for candidate in (path, path / "adapter", path / "model"):
        if (candidate / "adapter_config.json").is_file() or (candidate / "config.json").is_file():
            return candidate
    raise UserError(
        f"--adapter {path}: neither an adapter (adapter_config.json) nor a model folder (config.json)"
    )


# the weights file that PeftModel / transformers load with use_safetensors=True
SAFE_WEIGHTS = {
    "adapter": ("adapter_model.safetensors",),
    "model": ("model.safetensors", "model.safetensors.index.json"),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


def refuse_pickle(folder: Path, allow_pickle: bool) -> None:
    """Raise UnsafeWeightsError unless the weights file that will be loaded from `folder` is safetensors.

    Looks for the very file PEFT (`adapter_model.safetensors`) or transformers (`model.safetensors`,
    or its sharded index) loads, not for any `.safetensors` file: a stray one proves nothing.
    """
    if allow_pickle:
        return
    kind = "adapter" if (folder / "adapter_config.json").is_file() else "model"
    if any((folder / name).is_file() for name in SAFE_WEIGHTS[kind]):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    found = f"its weights are pickle ({', '.join(pickles)})" if pickles else "no weights file at all"
    raise UnsafeWeightsError(
        f"{folder} has no {SAFE_WEIGHTS[kind][0]} ({found}); pickle weights can run code when loaded: "
        "convert them to safetensors, or pass --allow-pickle if you trust their source"
    )


def load_for_inference(path: Path, allow_pickle: bool = False) -> tuple[torch.nn.Module, Any, list[str], int]:
    """Return (model in eval mode, tokenizer, label names, max_length) for a saved adapter or model.

    Raises UnsafeWeightsError when the adapter, the model or the adapter's base has only pickle
    weights and `allow_pickle` is off; UserError for a folder that is neither.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from scalelora.config import ModelConfig
    from scalelora.models import load_classifier, quiet_peft

    folder = find_model_dir(path)
    refuse_pickle(folder, allow_pickle)
    meta_file = folder / "scalelora.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = "right"  # as training padded (an adapter saved before scalelora set it too)
    if (folder / "adapter_config.json").is_file():
        with quiet_peft():  # the base is loaded in full precision here: no bitsandbytes
            from peft import PeftModel

        if not meta:
            base_name = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
            raise UserError(
                f"{folder} has no scalelora.json; load it with PeftModel on top of {base_name} yourself"
            )
        try:
            # the saved tokenizer's pad id is the one training read the last token by
            base, _ = load_classifier(
                ModelConfig(name=meta["model_name"], allow_pickle=allow_pickle),
                meta["labels"],
                pad_token_id=tokenizer.pad_token_id,
            )
        except UnsafeWeightsError:
            raise UnsafeWeightsError(
                f"the base model {meta['model_name']} that {folder} names has no safetensors weights (only "
                "pickle), which can run code when loaded: convert it to safetensors, or pass --allow-pickle "
                "if you trust its source"
            ) from None
        with quiet_peft():
            model = PeftModel.from_pretrained(base, str(folder), use_safetensors=not allow_pickle or None)
        labels = meta["labels"]
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), use_safetensors=not allow_pickle or None
        )
        labels = [model.config.id2label[i] for i in sorted(model.config.id2label)]
    return model.eval(), tokenizer, labels, int(meta.get("max_length", 512))


def load_calibration(path: Path, model: torch.nn.Module, labels: list[str]) -> Calibration:
    """The calibration stored with the model at `path` (checked against its labels), or the identity
    rule of its problem type when there is none. Raises CalibrationError for a file that does not fit."""
    from scalelora.models import HF_PROBLEM_TYPES

    folder = find_model_dir(path)
    stored = read_calibration(folder, labels)
    if stored is not None:
        return stored
    meta_file = folder / "scalelora.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    problem = meta.get("problem_type")
    if problem is None:
        hf = getattr(model.config, "problem_type", None)
        problem = MULTI_LABEL if hf == HF_PROBLEM_TYPES[MULTI_LABEL] else SINGLE_LABEL
    return Calibration(problem, list(labels))


def load_long_text(path: Path, max_length: int) -> LongText:
    """How the model at `path` treats a long text: its scalelora.json's record (truncation without one)."""
    meta_file = find_model_dir(path) / "scalelora.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return LongText.from_meta(meta, max_length)


@torch.inference_mode()
def text_logits(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    max_length: int,
    batch_size: int = 64,
    long_text: LongText | None = None,
    first: int = 0,
) -> torch.Tensor:
    """The model's float32 logits for `texts`, in order: truncated at `max_length` (padded on the right,
    a text ending in the pad token refused: models.encode_batch), or as `long_text` says. `first`: the
    number of the first text, for messages."""
    from scalelora.models import encode_batch

    if long_text is not None and (long_text.mode != "truncate" or long_text.clean_html):
        return document_logits(model, tokenizer, texts, long_text, batch_size)
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        encoded = encode_batch(
            tokenizer, chunk, None, max_length, lambda i, at=first + start: f"text {at + i}"
        )
        out.append(model(**encoded).logits.float())
    return torch.cat(out) if out else torch.zeros((0, 0))


@torch.inference_mode()
def predict_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    labels: list[str],
    texts: list[str],
    max_length: int,
    batch_size: int = 64,
    calibration: Calibration | None = None,
    threshold: float | None = None,
    top_k: int | None = None,
    long_text: LongText | None = None,
) -> list[dict[str, Any]]:
    """One result per text under `calibration` (default: raw softmax and argmax), each text treated as
    `long_text` says (default: truncated at `max_length`). Multi-label: `threshold` replaces every tuned
    threshold, `top_k` keeps at most the k most probable labels."""
    rule = calibration or Calibration(SINGLE_LABEL, list(labels))
    results = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        logits = text_logits(model, tokenizer, chunk, max_length, batch_size, long_text, start).numpy()
        probs, decided = rule.probabilities(logits), rule.decide(logits, threshold)
        for i, text in enumerate(chunk):
            result: dict[str, Any] = {"text": text}
            if rule.multi_label:
                chosen = sorted((k for k in range(len(labels)) if decided[i, k]), key=lambda k: -probs[i, k])
                result["labels"] = [labels[k] for k in chosen[:top_k]]
            else:
                result["label"] = labels[int(decided[i])]
            result["probs"] = {name: round(float(p), 6) for name, p in zip(labels, probs[i])}
            results.append(result)
    return results


def read_texts(path: Path, column: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"--input {path}: no such file")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as bad:
            raise DataError(f"{path}:{number}: not valid JSON ({bad.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(column), str):
            raise DataError(f"{path}:{number}: no string field '{column}' (set --text-column)")
        texts.append(row[column])
    return texts


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scalelora.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, type=Path, help="adapter/, model/ or run folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to classify (repeatable)")
    source.add_argument("--input", type=Path, help="JSONL file with one object per line")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--output", type=Path, help="write JSONL here instead of stdout")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--threshold",
        type=float,
        help="multi-label: one probability threshold for every label (replaces the tuned ones)",
    )
    parser.add_argument(
        "--top-k", type=int, help="multi-label: at most the K most probable labels of the set"
    )
    parser.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt weights (can run code)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold must be a probability in [0, 1], got {args.threshold}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    texts = args.text if args.text else read_texts(args.input, args.text_column)
    model, tokenizer, labels, max_length = load_for_inference(args.adapter, args.allow_pickle)
    calibration = load_calibration(args.adapter, model, labels)
    if not calibration.multi_label and (args.threshold is not None or args.top_k is not None):
        flag = "--threshold" if args.threshold is not None else "--top-k"
        raise UserError(
            f"{flag} applies to multi-label models; {args.adapter} is single-label (it predicts one label; "
            "every probability is printed)"
        )
    long_text = load_long_text(args.adapter, max_length)
    results = predict_texts(
        model,
        tokenizer,
        labels,
        texts,
        max_length,
        args.batch_size,
        calibration,
        args.threshold,
        args.top_k,
        long_text,
    )
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if args.output:
        atomic_write_text(args.output, lines)
    else:
        sys.stdout.write(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
