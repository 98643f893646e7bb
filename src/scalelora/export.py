"""`python -m scalelora.export --adapter DIR --merge --out DIR2 [--dtype float16] [--overwrite]`.

Merges a saved LoRA adapter (and its trained classification head) into the base model and saves
a plain transformers model: safetensors weights, config with the label names (`id2label`) and the
problem type (`problem_type`: single_label_classification or multi_label_classification),
tokenizer. It loads with `AutoModelForSequenceClassification.from_pretrained(DIR2)` alone, without
PEFT or scalelora, and predicts as the adapter did (the export checks this on a few probe texts
before it finishes).

An adapter calibrated in training (`calibration.json` with a temperature) is exported calibrated:
the output layer of the head is divided by the temperature, so the plain model's softmax (or
sigmoid) gives the calibrated probabilities. The tuned decision rule goes into `config.json`
(`decision_thresholds` per label for multi-label, `decision_biases` per class for single-label)
and, with the rest of the calibration, into DIR2/calibration.json, which `predict` reads.

How the run treated long texts (`data.long_text`, `data.clean_html`) is recorded in DIR2/scalelora.json,
and `python -m scalelora.predict --adapter DIR2` applies it. Plain transformers cannot: it truncates
every text at the tokenizer's limit (or the max_length you pass), and it sees `<br />` markup that
`data.clean_html` removed in training.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from scalelora.calibration import CALIBRATION_FILE
from scalelora.errors import UserError, exit_on_user_error
from scalelora.longtext import BEFORE, LongText

PROBE_TEXTS = [
    "an absolute delight from start to finish",
    "i want those two hours of my life back",
    "it was fine , i guess , nothing special",
    "na padam semma mass, but second half konjam bore",
]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@torch.inference_mode()
def probe_logits(model: torch.nn.Module, tokenizer: Any, max_length: int) -> torch.Tensor:
    from scalelora.models import encode_batch

    return model(**encode_batch(tokenizer, PROBE_TEXTS, None, max_length)).logits.float()


def head_output_layer(model: torch.nn.Module, num_labels: int) -> torch.nn.Linear | None:
    """The head's last linear layer, the one that outputs the logits (e.g. BERT `classifier`, RoBERTa
    `classifier.out_proj`, GPT-2 / Llama `score`)."""
    from scalelora.models import HEAD_MODULES

    found = None
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.Linear)
            and module.out_features == num_labels
            and name.split(".")[0] in HEAD_MODULES
        ):
            found = module
    return found


def fold_temperature(model: torch.nn.Module, num_labels: int, temperature: float) -> None:
    """Divide the output layer's weight and bias by `temperature`: the model then outputs logits / T.

    Raises UserError when no output layer is found (the export would not be calibrated).
    """
    layer = head_output_layer(model, num_labels)
    if layer is None:
        raise UserError(
            "cannot find the classification head's output layer to apply the fitted temperature; "
            "delete calibration.json's temperature to export the raw model"
        )
    with torch.no_grad():
        layer.weight.div_(temperature)
        if layer.bias is not None:
            layer.bias.div_(temperature)


def merge_adapter(
    adapter: Path, out: Path, dtype: str = "float32", overwrite: bool = False
) -> dict[str, Any]:
    """Merge `adapter` into its base and save the plain model in `out`; return what was checked.

    Raises UserError when `adapter` is not a LoRA adapter folder, when `out` already holds files
    (unless `overwrite`), or when the saved model does not reproduce the adapter's logits.
    """
    from transformers import AutoModelForSequenceClassification

    from scalelora.predict import find_model_dir, load_for_inference

    folder = find_model_dir(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise UserError(
            f"--adapter {adapter}: {folder} is already a plain transformers model (no adapter_config.json); "
            "load it with AutoModelForSequenceClassification directly"
        )
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} is not empty; pass --overwrite or choose another folder")
        shutil.rmtree(out)
    from scalelora.models import HF_PROBLEM_TYPES
    from scalelora.predict import load_calibration

    model, tokenizer, labels, max_length = load_for_inference(folder)
    calibration = load_calibration(folder, model, labels)
    before = probe_logits(model, tokenizer, max_length)
    # merge_and_unload folds B@A*scale into each target weight and swaps the trained head copy
    # (modules_to_save) in for the original, leaving a model PEFT no longer wraps
    merged = model.merge_and_unload()
    merged.config.id2label = dict(enumerate(labels))
    merged.config.label2id = {name: i for i, name in enumerate(labels)}
    merged.config.problem_type = HF_PROBLEM_TYPES[calibration.problem_type]
    merged.config.name_or_path = str(out)
    if calibration.temperature is not None and not calibration.temperature_in_weights:
        fold_temperature(merged, len(labels), calibration.temperature)
        before = before / calibration.temperature
        calibration.temperature_in_weights = True
    if calibration.thresholds is not None:
        merged.config.decision_thresholds = dict(zip(labels, calibration.thresholds))
    if calibration.biases is not None:
        merged.config.decision_biases = dict(zip(labels, calibration.biases))
    if dtype != "float32":
        merged = merged.to(DTYPES[dtype])
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    meta_file = folder / "scalelora.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    long_text = LongText.from_meta(meta, max_length)
    meta = {**BEFORE, **meta}  # an adapter saved before the long-text keys: truncation, no cleaning
    meta.update({"merged_from": str(folder.resolve()), "mode": "merged", "dtype": dtype})
    (out / "scalelora.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "labels.json").write_text(json.dumps(labels) + "\n")
    if calibration.temperature is not None or calibration.tuned:
        (out / CALIBRATION_FILE).write_text(json.dumps(calibration.to_json(), indent=2) + "\n")

    reloaded = (
        AutoModelForSequenceClassification.from_pretrained(str(out), use_safetensors=True).float().eval()
    )
    after = probe_logits(reloaded, tokenizer, max_length)
    max_diff = float((after - before).abs().max())
    tolerance = 1e-5 if dtype == "float32" else 5e-2
    if max_diff > tolerance:
        raise UserError(
            f"the merged model's logits differ from the adapter's by {max_diff:.2e} (> {tolerance:g}); "
            f"{out} is not a faithful export; please report this with the adapter's adapter_config.json"
        )
    return {
        "out": str(out),
        "labels": labels,
        "max_abs_logit_diff": max_diff,
        "dtype": dtype,
        "temperature": calibration.temperature,
        "long_text": long_text.record(),
    }


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scalelora.export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--adapter", required=True, type=Path, help="a run's adapter/ folder or the run folder"
    )
    parser.add_argument("--merge", action="store_true", help="merge LoRA into the base weights (required)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the plain transformers model")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of --out")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = parser.parse_args(argv)
    if not args.merge:
        raise UserError(
            "export writes a merged model: pass --merge (an unmerged adapter is already in adapter/)"
        )
    result = merge_adapter(args.adapter, args.out, args.dtype, args.overwrite)
    calibrated = (
        f", temperature {result['temperature']:.3f} folded into the head"
        if result["temperature"] is not None
        else ""
    )
    print(
        f"scalelora: merged {args.adapter} into {result['out']} ({result['dtype']}{calibrated}); "
        f"max |logit difference| vs the adapter on {len(PROBE_TEXTS)} probe texts: {result['max_abs_logit_diff']:.1e}"
    )
    recorded = result["long_text"]
    if recorded["long_text"] != "truncate" or recorded["clean_html"]:
        what = ", ".join(f"{k}={v}" for k, v in recorded.items())
        print(
            f"scalelora: {result['out']}/scalelora.json records {what}: python -m scalelora.predict --adapter "
            f"{result['out']} applies it; plain transformers does not (it truncates every text)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
