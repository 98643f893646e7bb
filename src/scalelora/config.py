"""The run configuration: a tree of typed dataclasses, loaded from YAML with strict `a.b=c` overrides.

Unknown keys and wrong types are errors that name the dotted key (and the closest valid key);
each section checks its own values in `__post_init__`; `RunConfig.validate` collects the
cross-section conflicts and raises them once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from scalelora.errors import ConfigError, one_line

# --- what a key declares -------------------------------------------------------------------------
#
# Each key is one dataclass field: its type (the annotation), default, doc (the string under it) and,
# in the field's metadata, its resume class and its `before` value, all declared in one place here.
#
# Resume class: may a run resumed from a checkpoint have another value than the run that wrote it?
# A resumed run must end as an uninterrupted run would, so a key is "identity" (refused on resume,
# naming the key) when it changes what is trained and from what (model, LoRA, labels, the training
# data and its subset), the data order and stream position (seed, batch size, accumulation), the loss,
# the optimizer and schedule (their state comes from the checkpoint: a changed lr would be silently
# ignored or bend the learning-rate curve), or which adapter is kept and when training stops (the
# metric, the eval split and its subset, early stopping, load_best_at_end). It is "free" when the
# resumed run trains exactly as before: where it writes, how often it logs and checkpoints, how it
# loads, what it reports. A key that declares no class is "identity": forgetting to decide makes a
# resume refuse too much, with a message naming the key, never too little.
#
# before: the value that reproduces the behaviour from before the key existed (default: the key's
# default). A checkpoint that does not record an identity key counts as having this value.

RESUME_CLASSES = ("identity", "free")
DEFAULT_RESUME_CLASS = "identity"
_SAME = object()


def key(
    default: Any,
    *,
    resume: str | None = None,
    before: Any = _SAME,
    resolve: Callable[[dict[str, Any]], Any] | None = None,
) -> Any:
    """A config key as a dataclass field: `default`, its resume class and its `before` value
    (see above). A list or mapping default is copied for each config. `resolve`, for a key with an
    `auto` value that the rest of its section decides, gives that decision from the section (as a
    mapping): config_differences compares what `auto` meant, not the word."""
    if resume is not None and resume not in RESUME_CLASSES:
        raise ValueError(f"resume={resume!r} is not one of {RESUME_CLASSES}")
    metadata: dict[str, Any] = {}
    if resume is not None:
        metadata["resume"] = resume
    if before is not _SAME:
        metadata["before"] = before
    if resolve is not None:
        metadata["resolve"] = resolve
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    path: str = key("rotten_tomatoes", resume="identity")
    """Hub dataset name, local folder with {train,validation,test}.{jsonl,csv,parquet}, or a dataset
    name under the data root (`root`, else $SCALELORA_DATA_DIR)."""
    root: str | None = key(None, resume="free")
    """Folder holding datasets by name; default $SCALELORA_DATA_DIR."""
    hub_config: str | None = key(None, resume="identity")
    """Configuration name of a hub dataset (e.g. `split` for dair-ai/emotion)."""
    text_column: str = key("text", resume="identity")
    text_pair_column: str | None = key(None, resume="identity")
    """Second text of a sentence pair (NLI-style tasks); None for single texts."""
    label_column: str = key("label", resume="identity")
    problem_type: Literal["auto", "single_label", "multi_label"] = key("auto", resume="identity")
    """`single_label`: one class per row (softmax); `multi_label`: a set of labels per row (one sigmoid per
    label); `auto`: multi-label when the training labels are lists (or `label_separator` is set)."""
    label_separator: str | None = key(None, resume="identity")
    """Multi-label data whose label column is a string (CSV): split it into label names at this
    separator, e.g. `|` for `joy|love`. Implies multi-label."""
    allow_empty_labels: bool = key(False, resume="identity")
    """Multi-label: accept rows whose label list is empty (no label applies). Off by default: an empty
    list is more often a data error."""
    train_split: str = key("train", resume="identity")
    # identity: the eval split picks the kept adapter (load_best_at_end) and when early stopping stops
    eval_split: str = key("validation", resume="identity")
    """Split evaluated every `eval.every` steps and used to pick the best checkpoint."""
    test_split: str | None = key("test", resume="free")
    """Split evaluated once at the end (None or a missing split: skipped)."""
    labels: list[str] | None = key(None, resume="identity")
    """Ordered label names; default labels.json, a ClassLabel feature, else sorted training labels."""
    keep_labels: list[str] | None = key(None, resume="identity")
    """Keep only rows with these labels (in this order), e.g. [Positive, Negative]."""
    max_train_samples: int | None = key(None, resume="identity")
    """A seeded random subset of the training split (never the first N: some sets are grouped by label)."""
    max_eval_samples: int | None = key(None, resume="identity")  # as eval_split
    max_length: int = key(128, resume="identity")
    """Tokens per model input: the whole input under `long_text=truncate` and `head_tail`, one window
    under `chunk`."""
    truncation_side: Literal["right", "left"] = key("right", resume="identity")
    """Which end `long_text=truncate` cuts (the other modes ignore it)."""
    long_text: Literal["truncate", "head_tail", "chunk"] = key("truncate", resume="identity")
    """What happens to a text longer than `max_length` tokens (docs/classification.md, long documents):
    `truncate` keeps its first `max_length` tokens (the last with truncation_side=left); `head_tail` keeps
    its first `head_tokens` and its last tokens, one input per text; `chunk` splits it into windows of
    `max_length` tokens overlapping by `chunk_stride`, runs every window and pools the windows' logits
    into the text's (`chunk_pool`), so `train.batch_size` and `train.eval_batch_size` count texts."""
    head_tokens: int | None = key(None, resume="identity")
    """`long_text=head_tail`: tokens kept from the start of a long text; the rest of the `max_length`
    budget comes from its end. None: a quarter of the budget, rounded up (128 head + 382 tail tokens at
    max_length 512, Sun et al. 2019's best on IMDB)."""
    chunk_stride: int | None = key(None, resume="identity")
    """`long_text=chunk`: tokens each window shares with the one before (the overlap, as the `stride` of
    HF tokenizers), at most half of max_length; None: a quarter of max_length (64 for windows of 256).
    The last window ends at the text's end."""
    max_chunks: int = key(8, resume="identity")
    """`long_text=chunk`: most windows per text. A text needing more keeps its first `max_chunks - 1`
    windows and its last one; the run logs and counts such texts (summary.json `long_text`). With
    `train.batch_size` it bounds a batch: at most batch_size x max_chunks windows of max_length tokens."""
    chunk_pool: Literal["mean", "max", "logmeanexp"] = key("mean", resume="identity")
    """`long_text=chunk`: how a text's logits come from its windows' logits, per class: `mean`, `max`,
    or `logmeanexp` (log of the mean of exp(logit): between the two, closer to max where one window is
    confident)."""
    clean_html: bool = key(False, resume="identity")
    """Before tokenizing (training, evaluation, teacher logits and predict alike): HTML line and block
    tags (`<br />`, `<p>`, `<hr>`, `<div>`, `<li>`, ...) with the whitespace around them become one space,
    inline tags (`<i>`, `<em>`, `<b>`, `<strong>`, `<u>`, `<span>`, `<a ...>`, `<font>`) are removed, and
    numeric and the basic named character references (`&amp;` `&lt;` `&gt;` `&quot;` `&apos;`
    `&nbsp;`) are decoded. Anything else in angle brackets (`<grin>`) is kept."""
    drop_empty: bool = key(False, resume="identity")
    """Drop rows with empty text (counted in the summary) instead of refusing them."""
    group_by_length: bool = key(True, resume="identity")
    """Batch examples of similar length together (less padding), seeded and identical across ranks."""
    class_balanced: bool = key(False, resume="identity")
    """Draw each epoch's training examples with probability inverse to their class's frequency (with
    replacement; every class equally likely), still grouped by length and exactly resumable."""
    num_workers: int = key(0, resume="free")
    # where the data is held, never what is trained: every value gives the same rows and tokens (tested),
    # so a run from before the key (every split in memory) compares equal to one with the default
    cache: Literal["auto", "always", "never"] = key("auto", resume="free")
    """Load and tokenize a local folder once per machine into an on-disk cache that every process
    memory-maps and the next run on the same files and settings reuses: `auto` when its split files
    total 32 MiB or more, `always`, or `never` (in memory, every process its own copy)."""
    cache_dir: str | None = key(None, resume="free")
    """Where the data cache lives; default `$SCALELORA_CACHE/data`, else `~/.cache/scalelora/data`."""

    def __post_init__(self) -> None:
        _check_positive("data.max_length", self.max_length)
        _check_positive("data.max_train_samples", self.max_train_samples)
        _check_positive("data.max_eval_samples", self.max_eval_samples)
        _check_non_negative("data.num_workers", self.num_workers)
        if self.keep_labels is not None and len(self.keep_labels) < 2:
            raise ConfigError("data.keep_labels must name at least 2 labels")
        if self.label_separator == "":
            raise ConfigError("data.label_separator is empty: give the character between labels, e.g. '|'")
        _check_positive("data.head_tokens", self.head_tokens)
        _check_non_negative("data.chunk_stride", self.chunk_stride)
        if self.max_chunks < 2:
            raise ConfigError(
                f"data.max_chunks must be at least 2 (the first windows and the last), got {self.max_chunks}; "
                "for one input per text use data.long_text=truncate or head_tail"
            )
        if (
            self.long_text == "chunk"
            and self.chunk_stride is not None
            and self.chunk_stride > self.max_length // 2
        ):
            raise ConfigError(
                f"data.chunk_stride={self.chunk_stride} is the overlap of consecutive windows: at most half of "
                f"data.max_length={self.max_length}, or windows would mostly repeat each other"
            )
        if self.long_text != "truncate" and self.text_pair_column:
            raise ConfigError(
                f"data.long_text={self.long_text} reads single texts; with data.text_pair_column use "
                "data.long_text=truncate"
            )
        if self.problem_type == "single_label" and (self.label_separator or self.allow_empty_labels):
            key = "data.label_separator" if self.label_separator else "data.allow_empty_labels"
            raise ConfigError(
                f"{key} is for multi-label data, but data.problem_type=single_label: "
                "set data.problem_type=multi_label (or auto), or drop it"
            )


@dataclass
class ModelConfig:
    name: str = key("minilm-l6", resume="identity")
    """Hub name, local path, or an offline alias: `minilm-l6`, `smollm2-135m`."""
    mode: Literal["lora", "full", "head_only"] = key("lora", resume="identity")
    """lora: frozen base + LoRA adapters + trainable head; full: every weight (a teacher);
    head_only: frozen base, trainable classification head."""
    dtype: Literal["float32", "bfloat16", "float16"] = key("float32", resume="identity")
    """Dtype of the frozen base weights. Trainable weights (LoRA, head; every weight in mode=full) stay
    float32; a bfloat16/float16 base needs the matching train.precision."""
    revision: str | None = key(None, resume="identity")
    trust_remote_code: bool = key(False, resume="free")
    """Run Python code shipped with a hub model. Off unless you trust the model's authors."""
    allow_pickle: bool = key(False, resume="free", before=True)  # before it, pickle weights loaded
    """Load model weights stored as pickle (`pytorch_model.bin`), which can run code when loaded: the
    base of `model.name` (also as the base an adapter names) and `distill.teacher`. Off: safetensors only."""
    train_head: bool = key(True, resume="identity")
    """In lora mode, also train (and save) the classification head."""
    # free: non-reentrant checkpointing recomputes the same activations with the random state restored,
    # so a step is the same with it or without (test_bnb.py); before `auto`, the default was false
    gradient_checkpointing: bool | Literal["auto"] = key(
        "auto",
        resume="free",
        before=False,
        resolve=lambda model: bool(model.get("load_in_8bit") or model.get("load_in_4bit")),
    )
    """Recompute activations in backward instead of keeping them (non-reentrant): less memory, slower
    steps. `auto`: on for an 8/4-bit base (as PEFT's k-bit preparation defaults to; the log says so),
    off otherwise (`checkpointing()` resolves it)."""
    load_in_8bit: bool = key(False, resume="identity")
    load_in_4bit: bool = key(False, resume="identity")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = key("nf4", resume="identity")
    bnb_4bit_use_double_quant: bool = key(True, resume="identity")
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = key("bfloat16", resume="identity")
    attn_implementation: str | None = key(None, resume="identity")
    """Passed to from_pretrained (e.g. `sdpa`, `eager`); None lets transformers choose."""

    def checkpointing(self) -> bool:
        """`gradient_checkpointing` resolved: `auto` is on for an 8/4-bit base."""
        if self.gradient_checkpointing == "auto":
            return self.load_in_8bit or self.load_in_4bit
        return bool(self.gradient_checkpointing)


@dataclass
class LoraConfig:
    r: int = key(8, resume="identity")
    alpha: float = key(16.0, resume="identity")
    dropout: float = key(0.1, resume="identity")
    target_modules: list[str] | None = key(None, resume="identity")
    """Module names to adapt; `all-linear` for every linear layer but the head; None uses the preset for
    the architecture (see models.LORA_PRESETS)."""
    bias: Literal["none", "all", "lora_only"] = key("none", resume="identity")

    def __post_init__(self) -> None:
        _check_positive("lora.r", self.r)
        _check_positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainConfig:
    epochs: float = key(3.0, resume="identity")
    max_steps: int | None = key(None, resume="identity")
    """Optimizer steps; overrides epochs when set."""
    batch_size: int = key(32, resume="identity")
    """Examples per micro-batch per process."""
    eval_batch_size: int = key(128, resume="free")
    grad_accum: int = key(1, resume="identity")
    lr: float = key(5e-4, resume="identity")
    head_lr: float | None = key(None, resume="identity")
    """Learning rate of the classification head; default `lr`."""
    weight_decay: float = key(0.01, resume="identity")
    """AdamW weight decay; never applied to biases and norm weights."""
    scheduler: Literal["linear", "cosine", "constant"] = key("linear", resume="identity")
    warmup_ratio: float = key(0.06, resume="identity")
    warmup_steps: int | None = key(None, resume="identity")
    max_grad_norm: float | None = key(1.0, resume="identity")
    # identity, compared as resolved (what `auto` chose on this host; build_accelerator writes it back)
    precision: Literal["auto", "no", "fp16", "bf16"] = key("auto", resume="identity", before="no")
    """`no` (fp32), `fp16` (GPU only) or `bf16` autocast. `auto`: bf16 on CUDA devices of compute
    capability 8.0 or higher, with TF32 for the fp32 matmuls that remain; on a CPU, bf16 only where it has
    native bf16 (amx_bf16, avx512_bf16) and the project's own measurement shows bf16 faster at equal
    accuracy there (`runtime.CPU_BF16_MEASURED`; none does yet); fp32 otherwise; a bfloat16/float16
    `model.dtype` picks its match. The choice is logged with its reason; config.yaml and summary.json
    record the resolved value."""
    log_every: int = key(10, resume="free")
    on_nonfinite: Literal["skip", "stop"] = key("skip", resume="free")
    """A non-finite loss or gradient: skip the optimizer step (stop after `max_nonfinite` in a row),
    or save the last good state and stop."""
    max_nonfinite: int = key(3, resume="free")
    compile: bool | Literal["auto"] = key(False, resume="free")
    """torch.compile the model (shapes bounded by padding to multiples of 8). `auto`: on where it pays,
    which is on CUDA; off on CPU, where a compiled MiniLM LoRA step ran at 0.89x eager after 65 s of
    compiling (docs/performance.md). Accelerate's `prepare` compiles it (around DDP; DeepSpeed's module
    in place), with the backend the launch config names (`dynamo_backend`), inductor when it names none;
    a launch config's backend alone does not compile."""
    # identity: another random stream for the dropout masks; before it, torch's dropout ran
    mask_dropout: bool = key(True, resume="identity", before=False)
    """On CPU, the model's and LoRA's dropout layers draw their masks four elements per 64-bit random draw
    and keep them as 1 byte an element for backward (`models.MaskDropout`; the drop probability is
    rounded to a multiple of 1/65536), not with torch's `bernoulli_` and a 4-byte float mask: faster and
    smaller (docs/performance.md). CUDA keeps torch's fused dropout, which already keeps 1-byte masks;
    false keeps torch's dropout everywhere."""
    # free: both kernels keep the same AdamW state (tested both ways); before it, CPU runs used torch's
    # default AdamW (false) and CUDA runs the fused one (as auto does)
    fused_adamw: bool | Literal["auto"] = key("auto", resume="free", before=False)
    """AdamW as one fused kernel over all tensors (`torch.optim.AdamW(fused=True)`), the same update as
    torch's default AdamW (multi-tensor on CUDA, a loop over tensors on the CPU) up to float rounding.
    `auto`: on when every trainable tensor sits on one CUDA device or on the CPU (where a full fine-tune's
    optimizer step over MiniLM-L6's 22.7M weights is several times faster: docs/performance.md); `true`:
    on, refused where it cannot run; `false`: torch's default."""
    timing_skip_steps: int = key(2, resume="free")
    """Optimizer steps left out of `summary.json`'s `steady_state` throughput (warm-up: allocator,
    kernel selection, compilation); 0 counts every step."""
    loss: Literal["ce", "focal"] = key("ce", resume="identity")
    """Hard-label loss: cross-entropy, or focal loss `-(1 - p)^gamma log p` (Lin et al. 2017), which
    down-weights examples the model already gets right. Multi-label: `ce` is binary cross-entropy per
    label, `focal` the sigmoid focal loss, both summed over labels."""
    focal_gamma: float = key(2.0, resume="identity")
    """The focal loss's gamma (0 gives cross-entropy)."""
    label_smoothing: float = key(0.0, resume="identity")
    """Share of each target spread evenly over all classes (Szegedy et al. 2016); 0 disables.
    Multi-label: each label's 0/1 target becomes y (1 - eps) + eps / 2."""
    class_weights: Literal["none", "balanced"] | dict[str, float] = key("none", resume="identity")
    """Per-class weights of the hard-label loss: `none`; `balanced` (N / (K * count of the class), on the
    training split after filtering); or a mapping `{label: weight}`, e.g. `{neg: 1, pos: 3}`. The
    loss is sum(w_i * loss_i) / sum(w_i) over the global batch; distillation terms are not weighted.
    Multi-label: per-label `pos_weight` of the BCE (the weight of a label's positive term): `balanced`
    gives negatives / positives of the label, a mapping sets it by hand; the loss is divided by N."""

    def __post_init__(self) -> None:
        _check_positive("train.epochs", self.epochs)
        _check_positive("train.max_steps", self.max_steps)
        _check_positive("train.batch_size", self.batch_size)
        _check_positive("train.eval_batch_size", self.eval_batch_size)
        _check_positive("train.grad_accum", self.grad_accum)
        _check_positive("train.lr", self.lr)
        _check_positive("train.head_lr", self.head_lr)
        _check_non_negative("train.weight_decay", self.weight_decay)
        _check_non_negative("train.warmup_steps", self.warmup_steps)
        _check_positive("train.max_grad_norm", self.max_grad_norm)
        _check_positive("train.log_every", self.log_every)
        _check_positive("train.max_nonfinite", self.max_nonfinite)
        _check_non_negative("train.timing_skip_steps", self.timing_skip_steps)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check_non_negative("train.focal_gamma", self.focal_gamma)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if isinstance(self.class_weights, dict):
            if not self.class_weights:
                raise ConfigError(
                    "train.class_weights is an empty mapping: give {label: weight, ...} or none"
                )
            bad = {k: v for k, v in self.class_weights.items() if v <= 0}
            if bad:
                raise ConfigError(
                    f"train.class_weights: weights must be positive, got {bad}; "
                    "to leave a class out use data.keep_labels"
                )


@dataclass
class EvalConfig:
    metric: Literal["macro_f1", "accuracy", "micro_f1"] = key("macro_f1", resume="identity")
    """Metric on the eval split that picks the best checkpoint (with thresholds tuned, the tuned value).
    Multi-label: macro-F1 is the mean over labels, accuracy the subset accuracy (every label right)."""
    # free: the weights at each step are the same at any cadence; with early stopping the patience
    # counts evaluations, so there the checkpoint records it (checkpoint.resume_identity)
    every: int | None = key(None, resume="free")
    """Evaluate every N optimizer steps; None: once per epoch. Always at the end."""
    early_stopping_patience: int = key(0, resume="identity")  # it decides where training stops
    """Stop after this many evaluations without improvement; 0 disables."""
    load_best_at_end: bool = key(True, resume="identity")
    """Finish with the best weights (saved as adapter/) rather than the last ones."""
    sample_predictions: int = key(8, resume="free")
    """Validation texts shown with gold label and prediction before and after training."""
    save_predictions: bool = key(False, resume="free")
    """Also write `predictions/<split>.jsonl` (example id, gold and predicted label, probabilities) for
    the final evaluation of each split, for error analysis and paired comparisons of runs."""
    extra_metrics: list[str] = key([], resume="free")
    """More metrics from the `evaluate` library, reported for every split: hub names (e.g.
    `matthews_correlation`; needs internet) or local folders / .py files holding a module."""
    trust_remote_code: bool = key(False, resume="free")
    """Run the code of `extra_metrics` (every evaluate module is a Python script). Off unless you trust it."""
    # free: fitted after training, from the final weights; before it, no calibration was fitted
    calibrate: bool = key(True, resume="free", before=False)
    """After training, fit temperature scaling on the eval split with the best weights, store it with
    the model (`calibration.json`) and apply it in predict and export; false keeps the raw probabilities."""
    # identity: the tuned rule decides which evaluation is the best checkpoint, as eval.metric does
    tune_thresholds: Literal["auto", "none", "macro_f1", "micro_f1"] = key(
        "auto", resume="identity", before="none"
    )
    """Decision rule tuned on the eval split for this metric and stored with the model: per-label
    thresholds (multi-label) or per-class additive logit biases (single-label; a threshold for binary).
    `auto`: macro_f1 for multi-label data, none for single-label."""

    def __post_init__(self) -> None:
        _check_positive("eval.every", self.every)
        _check_non_negative("eval.early_stopping_patience", self.early_stopping_patience)
        _check_non_negative("eval.sample_predictions", self.sample_predictions)


@dataclass
class CheckpointConfig:
    every: int | None = key(None, resume="free")
    """Save resumable state every N optimizer steps; None: only at the end (and on preemption)."""
    keep_last: int = key(2, resume="free")
    trust_unsigned: bool = key(False, resume="free", before=True)  # before signing, none was signed
    """Resume from a checkpoint whose manifest is not signed with this user's key (written by another
    user or machine, or before scalelora signed checkpoints). It waives the signature only: the files
    must still match the manifest exactly, and nothing is unpickled that could run code; but the
    training state is then only as trustworthy as its source."""

    def __post_init__(self) -> None:
        _check_positive("checkpoint.every", self.every)
        _check_positive("checkpoint.keep_last", self.keep_last)


@dataclass
class WandbConfig:
    project: str = key("scalelora", resume="free")
    entity: str | None = key(None, resume="free")
    name: str | None = key(None, resume="free")
    group: str | None = key(None, resume="free")
    tags: list[str] = key([], resume="free")
    mode: Literal["online", "offline", "disabled"] | None = key(None, resume="free")
    """None: online when an API key is configured, else offline (so nothing hangs)."""


@dataclass
class TrackingConfig:
    report_to: Literal["none", "wandb"] = key("none", resume="free")
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class DistillConfig:
    enabled: bool = key(False, resume="identity")
    weight: float = key(0.5, resume="identity")
    """Share of the distillation term (alpha in Hinton et al. 2015):
    loss = (1 - weight) * CE + weight * T^2 * KL(teacher || student)."""
    temperature: float = key(2.0, resume="identity")
    teacher: str = key("self", resume="identity")
    """`self` (the frozen base with adapters disabled), `cache` (precomputed logits), or a model path/name."""
    cache_dir: str | None = key(None, resume="free")
    """Folder written by `python -m scalelora.teacher_logits` (teacher=cache)."""
    hidden_weight: float = key(0.0, resume="identity")
    """Weight of an MSE loss between student and teacher pooled hidden states (0 disables)."""
    calibrated_teacher: bool = key(False, resume="identity")
    """Distil from the teacher's temperature-calibrated logits (its `calibration.json`, recorded in a
    logits cache) instead of its raw logits."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"distill.weight must be in [0, 1], got {self.weight}")
        _check_positive("distill.temperature", self.temperature)
        _check_non_negative("distill.hidden_weight", self.hidden_weight)


@dataclass
class RunConfig:
    recipe: str = key("", resume="free")
    """Name of the recipe this config came from (set by the loader)."""
    description: str = key("", resume="free")
    output_dir: str | None = key(None, resume="free")
    """Where the run writes everything; default runs/<recipe>."""
    seed: int = key(42, resume="identity")
    resume: str | None = key(None, resume="free")
    """`auto`: continue from the newest complete checkpoint in output_dir (or start fresh); a path: that checkpoint."""
    overwrite: bool = key(False, resume="free")
    """Start over in an output_dir that already holds a run (its checkpoints are deleted)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    pipeline: dict[str, list[str]] = key({}, resume="free")
    """Per-run overrides for `python -m scalelora.pipeline` (run name -> [key=value, ...]), so a
    recipe carries a whole study; `python -m scalelora.train` reads the rest of the recipe only."""
    explicit_keys: set[str] = field(default_factory=set, compare=False, repr=False, metadata={"key": False})
    """Not a config key (not settable, not in to_dict): the dotted keys the command line set, filled by
    load_config, so a data-driven default (recipe `auto`) never changes what the user chose."""

    def validate(self) -> None:
        """Raise one ConfigError listing every cross-section conflict."""
        problems = []
        if self.recipe and (Path(self.recipe).name != self.recipe or self.recipe in (".", "..")):
            # the default output_dir is runs/<recipe>: a path here would write somewhere else
            problems.append(
                f"recipe={self.recipe!r} must be a plain name, not a path; set output_dir instead"
            )
        if self.model.load_in_8bit and self.model.load_in_4bit:
            problems.append("model.load_in_8bit and model.load_in_4bit are exclusive: pick one")
        if self.model.mode == "full" and (self.model.load_in_8bit or self.model.load_in_4bit):
            problems.append(
                "model.mode=full cannot train a quantized base: use model.mode=lora with 8/4-bit, "
                "or load_in_8bit=false for a full fine-tune"
            )
        if self.model.load_in_8bit or self.model.load_in_4bit:
            problem = bnb_device_problem()
            if problem:
                problems.append(problem)
        if self.distill.enabled:
            if self.distill.teacher == "self" and self.model.mode != "lora":
                problems.append(
                    "distill.teacher=self needs model.mode=lora (the teacher is the base with adapters "
                    "disabled): set distill.teacher to a model path or `cache`"
                )
            if self.distill.teacher == "cache" and not self.distill.cache_dir:
                problems.append(
                    "distill.teacher=cache needs distill.cache_dir (build it with python -m scalelora.teacher_logits)"
                )
        if self.model.dtype != "float32" and self.train.precision == "no":
            wanted = "bf16" if self.model.dtype == "bfloat16" else "fp16"
            problems.append(
                f"model.dtype={self.model.dtype} needs train.precision={wanted} (autocast mixes the float32 "
                "trainable weights with the low-precision base), or model.dtype=float32"
            )
        if self.eval.extra_metrics and not self.eval.trust_remote_code:
            problems.append(
                f"eval.extra_metrics={','.join(self.eval.extra_metrics)} runs each evaluate module's Python code: "
                "set eval.trust_remote_code=true if you trust them, or drop eval.extra_metrics"
            )
        if self.resume not in (None, "auto") and self.overwrite:
            problems.append("resume=PATH and overwrite=true contradict each other: drop one")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.recipe or 'run'}")


def bnb_device_problem() -> str | None:
    """Why 8/4-bit loading cannot work here with the installed bitsandbytes (None when it can)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return (
            "model.load_in_8bit/load_in_4bit needs bitsandbytes: pip install 'scalelora[bnb]', "
            "or set both to false"
        )
    import bitsandbytes
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    supported = getattr(bitsandbytes, "supported_torch_devices", {"cuda"})  # before 0.45: CUDA only
    if device not in supported:
        return (
            f"model.load_in_8bit/load_in_4bit: the installed bitsandbytes {bitsandbytes.__version__} has no "
            f"{device} backend (it supports {', '.join(sorted(supported))}): set both to false, or "
            "pip install 'bitsandbytes>=0.50' (which runs on CPU too)"
        )
    return None


# --- the keys ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    """What config.py declares about one dotted key."""

    key: str
    hint: Any
    """The type annotation (resolved)."""
    default: Any
    resume: str
    """`identity` or `free` (see RESUME_CLASSES); `identity` where none is declared."""
    declared: bool
    """Whether the field declares its resume class itself."""
    before: Any
    """The value that reproduces the behaviour from before the key existed."""


def is_key_field(f: dataclasses.Field) -> bool:
    """A field that is a config key or section (not bookkeeping such as RunConfig.explicit_keys)."""
    return f.metadata.get("key", True)


def key_infos(root: type | None = None) -> dict[str, KeyInfo]:
    """Every dotted key of the config tree (`root`, default RunConfig), in declaration order; a nested
    dataclass is a section, not a key."""

    def walk(cls: type, prefix: str) -> dict[str, KeyInfo]:
        hints = typing.get_type_hints(cls)
        out: dict[str, KeyInfo] = {}
        for f in dataclasses.fields(cls):
            if not is_key_field(f):
                continue
            dotted, hint = f"{prefix}{f.name}", hints[f.name]
            if dataclasses.is_dataclass(hint):
                out |= walk(hint, f"{dotted}.")
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            declared = f.metadata.get("resume")
            before = f.metadata.get("before", default)
            resume = declared or DEFAULT_RESUME_CLASS
            out[dotted] = KeyInfo(dotted, hint, default, resume, declared is not None, before)
        return out

    return walk(root or RunConfig, "")


def config_keys(root: type | None = None) -> list[str]:
    """Every dotted key of the config tree (a nested dataclass is a section, not a key)."""
    return list(key_infos(root))


def key_info(dotted: str, root: type | None = None) -> KeyInfo:
    """What config.py declares about `dotted`; KeyError for a name that is not a key."""
    return key_infos(root)[dotted]


def resume_keys(resume: str, root: type | None = None) -> tuple[str, ...]:
    """The keys of one resume class (`identity` or `free`)."""
    if resume not in RESUME_CLASSES:
        raise ValueError(f"resume={resume!r} is not one of {RESUME_CLASSES}")
    return tuple(k for k, info in key_infos(root).items() if info.resume == resume)


_RAISE = object()


def dotted_get(tree: Any, dotted: str, default: Any = _RAISE) -> Any:
    """`tree["a"]["b"]` (a mapping such as to_dict's) or `tree.a.b` (a config) for key "a.b";
    `default` when a part is missing (KeyError when none is given)."""
    for part in dotted.split("."):
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        elif (
            dataclasses.is_dataclass(tree)
            and not isinstance(tree, type)
            and any(f.name == part and is_key_field(f) for f in dataclasses.fields(tree))
        ):
            tree = getattr(tree, part)
        elif default is _RAISE:
            raise KeyError(dotted)
        else:
            return default
    return tree


def config_differences(
    recorded: Any, now: Any, ignore: Iterable[str] = (), keys: Iterable[str] | None = None
) -> list[str]:
    """The keys on which a recorded config (a mapping as config.yaml or to_dict holds it, possibly
    written before some keys existed) and `now` differ, each as "key: X then, Y now".

    A key the record lacks counts as its declared `before` value, so a key added later whose default
    keeps the old behaviour is no difference, and a changed default is one. Keys in `ignore` (a trailing
    "." covers a section) and keys `now` lacks are skipped. Values are compared as JSON stores them.
    """
    skip = tuple(ignore)
    out = []
    for dotted in keys if keys is not None else config_keys():
        if any(dotted == i or (i.endswith(".") and dotted.startswith(i)) for i in skip):
            continue
        value = dotted_get(now, dotted, _ABSENT)
        if value is _ABSENT:
            continue
        then = dotted_get(recorded, dotted, _ABSENT)
        shown = ""
        if then is _ABSENT:
            then, shown = key_info(dotted).before, " (before the key)"
        resolve = _key_metadata(dotted).get("resolve")
        if resolve is not None:  # compare what `auto` decided on each side, from its own section
            section = dotted.rpartition(".")[0]
            if then == "auto":
                then = resolve(_as_mapping(dotted_get(recorded, section, {})))
            if value == "auto":
                value = resolve(_as_mapping(dotted_get(now, section, {})))
        then, value = json.loads(json.dumps(then)), json.loads(json.dumps(value))
        if then != value:
            out.append(f"{dotted}: {then!r} then{shown}, {value!r} now")
    return out


_ABSENT = object()


def _as_mapping(section: Any) -> dict[str, Any]:
    return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section


def _key_metadata(dotted: str) -> Any:
    """The dataclass field metadata `key()` declared for `dotted`."""
    section, _, name = dotted.rpartition(".")
    cls: Any = RunConfig
    for part in section.split(".") if section else []:
        cls = typing.get_type_hints(cls)[part]
    return next(f.metadata for f in dataclasses.fields(cls) if f.name == name)


# --- loading -------------------------------------------------------------------------------------

RECIPES_PACKAGE = "scalelora.recipes"
AUTO_RECIPE = "auto"
"""The reserved recipe whose settings are chosen from the data (autoconfig.py); also used without --config."""


def recipe_names() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")]
        for p in resources.files(RECIPES_PACKAGE).iterdir()
        if p.name.endswith(".yaml")
    )


def recipe_descriptions() -> dict[str, str]:
    out = {}
    for name in recipe_names():
        data = yaml.safe_load(resources.files(RECIPES_PACKAGE).joinpath(f"{name}.yaml").read_text()) or {}
        out[name] = (
            str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""
        )
    return out


def read_recipe(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """Return (recipe name, raw mapping) for a shipped recipe name or a YAML path.

    Raises ConfigError when neither exists or the YAML does not parse to a mapping.
    """
    path = Path(name_or_path)
    if name_or_path in recipe_names():
        text = resources.files(RECIPES_PACKAGE).joinpath(f"{name_or_path}.yaml").read_text()
        name = name_or_path
    elif path.is_file():
        text = path.read_text()
        name = path.stem
    else:
        close = difflib.get_close_matches(name_or_path, recipe_names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"--config {name_or_path}: no such recipe or file{hint}; `python -m scalelora.train --list` shows the recipes"
        )
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {name_or_path}: not valid YAML ({one_line(err)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {name_or_path}: the YAML must be a mapping of config keys")
    return name, raw


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["a.b=1", "c=x"] into a nested mapping; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is both a value and a section")
        node[parts[-1]] = parsed
    return nested


def override_keys(overrides: list[str]) -> list[str]:
    """The dotted keys that `key=value` overrides set (a mapping value counts as its own key)."""

    def walk(tree: dict[str, Any], prefix: str) -> list[str]:
        keys = []
        for key, value in tree.items():
            dotted = f"{prefix}{key}"
            is_section = isinstance(value, dict) and dotted not in MAPPING_KEYS
            keys += walk(value, f"{dotted}.") if is_section else [dotted]
        return keys

    return walk(parse_overrides(overrides), "")


# Config keys whose value is itself a mapping (not a section of keys).
MAPPING_KEYS = ("train.class_weights", "pipeline")


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(recipe: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a recipe (name or path), apply dotted overrides, build and validate the config tree.

    Raises ConfigError naming the dotted key for unknown keys, wrong types and invalid values.
    """
    name, raw = read_recipe(recipe)
    raw = deep_merge(raw, parse_overrides(overrides or []))
    raw.setdefault("recipe", name)
    config = build_dataclass(RunConfig, raw, prefix="")
    config.validate()
    # what the user set on the command line: the data-driven default (recipe `auto`) never changes it
    config.explicit_keys = set(override_keys(overrides or []))
    return config


# Names users bring from HF TrainingArguments / PEFT, mapped to ours for the "did you mean" hint.
KEY_SYNONYMS = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "scheduler",
    "mixed_precision": "precision",
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "max_seq_length": "max_length",
    "model_name_or_path": "name",
    "dataset": "path",
}
# Names that mean another key only in one section (`lora.alpha` is a key of its own).
SECTION_SYNONYMS = {
    "distill.alpha": "distill.weight",
}


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        section = prefix.rstrip(".") or "config"
        raise ConfigError(
            f"{section} must be a mapping, got {type(raw).__name__}; set its keys instead (e.g. {section}.KEY=VALUE)"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if is_key_field(f)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            synonym = KEY_SYNONYMS.get(key)
            if dotted in SECTION_SYNONYMS:
                close = [SECTION_SYNONYMS[dotted]]
            elif synonym in names:
                close = [f"{prefix}{synonym}"]
            else:
                close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        kwargs[key] = coerce(hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def coerce(hint: Any, value: Any, key: str) -> Any:
    """Check `value` against the type hint and convert the few safe cases (int -> float, "a,b" -> list)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for arg in non_none:
            try:
                return coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}: " + "; or ".join(e.split(": ", 1)[-1] for e in errors))
    if origin is Literal:
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
            value = "no" if value is False else "yes"  # YAML 1.1 reads a bare `no` as false
        if value in args:
            return value
        choices = ", ".join(str(a) for a in args)
        raise ConfigError(f"{key}: {value!r} is not one of {choices}")
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value if value is not None else {}, prefix=f"{key}.")
    if origin is dict:
        key_type, value_type = args
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping {{name: value, ...}}, got {value!r}")
        return {
            coerce(key_type, k, f"{key}.{k}"): coerce(value_type, v, f"{key}.{k}") for k, v in value.items()
        }
    if origin is list:
        (item_type,) = args
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)  # YAML reads 5e-4 (no dot) as a string
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # a NaN slips past every `<= 0` check
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {hint}")  # a bug in this module, not user input


def to_dict(config: Any) -> dict[str, Any]:
    """The config keys as plain data (config.yaml, summary.json, results stamps); fields that are not
    keys (RunConfig.explicit_keys) are left out."""
    out = {}
    for f in filter(is_key_field, dataclasses.fields(config)):
        value = getattr(config, f.name)
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def _check_positive(key: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{key} must be positive, got {value}")


def _check_non_negative(key: str, value: float | None) -> None:
    if value is not None and value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value}")
