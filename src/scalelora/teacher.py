"""Distillation targets: the student's own base with adapters disabled, a separate teacher model, or
logits cached on disk by `python -m scalelora.teacher_logits`.

A teacher is frozen and in eval mode, so its logits for an example never change: that is what makes
the three sources interchangeable (and the cache exact).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from scalelora.calibration import read_calibration
from scalelora.config import ModelConfig, RunConfig
from scalelora.errors import ConfigError, DataError
from scalelora.longtext import BEFORE, LongText
from scalelora.runtime import autocast, resolve_precision, unwrap_model, without_zero3_init

CACHE_MANIFEST = "manifest.json"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class TeacherOutput:
    def __init__(self, logits: torch.Tensor, pooled: torch.Tensor | None = None) -> None:
        self.logits = logits
        self.pooled = pooled


def run_frozen(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    want_hidden: bool,
    cast: Any = contextlib.nullcontext,
) -> TeacherOutput:
    """The frozen model's logits (and mean-pooled last hidden state), in float32 as the student's are;
    `cast()` is the context its forward runs in (the run's autocast for a model Accelerate does not wrap)."""
    was_training = model.training
    model.eval()  # no dropout: the teacher's logits must not depend on the step
    try:
        # no_grad, not inference_mode: the self-teacher is the student's own (ZeRO-3 sharded) model,
        # whose parameters gathered under inference_mode would stay inference tensors, and PEFT's
        # disable_adapter() then fails setting requires_grad on them
        with torch.no_grad(), cast():
            out = model(**batch, output_hidden_states=want_hidden)
    finally:
        model.train(was_training)
    # pooled in float32, outside autocast, as the student's own hidden states are
    hidden = out.hidden_states[-1].float() if want_hidden else None
    pooled = mean_pool(hidden, batch["attention_mask"]) if hidden is not None else None
    return TeacherOutput(
        out.logits.detach().float().clone(), None if pooled is None else pooled.detach().clone()
    )


class SelfTeacher:
    """The frozen base (e.g. a full fine-tuned teacher) under the student's adapters: no second copy."""

    @staticmethod
    def check_base(model_name: str, untrained_head: list[str]) -> None:
        """Raise ConfigError when the base's classification head was initialised at random: with the
        adapters disabled the teacher would be that random head, and KD would distil noise."""
        if untrained_head:
            raise ConfigError(
                f"distill.teacher=self distils from model.name={model_name} with the adapters disabled, but its "
                f"classification head ({', '.join(untrained_head)}) is newly initialised, so its logits are random: "
                "train a teacher first (model.mode=full) and use its model/ folder as model.name, or set "
                "distill.teacher to a trained classifier's path or to cache"
            )

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], idx: torch.Tensor, want_hidden: bool
    ) -> TeacherOutput:
        # the PEFT model inside DDP / DeepSpeed wrappers (compiled, when it is); the teacher forward needs
        # no gradient sync
        inner = unwrap_model(model, keep_compiled=True)
        with inner.disable_adapter():
            return run_frozen(inner, batch, want_hidden)


class ModelTeacher:
    """A separate (possibly larger) teacher that shares the label set and the tokenizer."""

    def __init__(
        self, cfg: RunConfig, label_names: list[str], student_tokenizer: Any, device: torch.device | str
    ) -> None:
        from scalelora.models import load_classifier, load_tokenizer

        device = torch.device(device)  # "cpu" as well as a device
        teacher_cfg = ModelConfig(
            name=cfg.distill.teacher,
            dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            allow_pickle=cfg.model.allow_pickle,
            attn_implementation=cfg.model.attn_implementation,
        )
        # the student's forward runs under Accelerate's autocast; the teacher is not prepared, so it gets
        # the same autocast here (the run's precision, already resolved by build_accelerator)
        precision = resolve_precision(cfg.train.precision, cfg.model.dtype, device.type == "cuda").precision
        self.cast = lambda: autocast(precision, device)
        tokenizer = load_tokenizer(teacher_cfg)
        if tokenizer.get_vocab() != student_tokenizer.get_vocab():
            raise ConfigError(
                f"distill.teacher={cfg.distill.teacher} uses another tokenizer than model.name={cfg.model.name}; "
                "use distill.teacher=cache with logits from python -m scalelora.teacher_logits"
            )
        # whole on every rank, in teacher_cfg.dtype: under ZeRO-3 transformers would partition it with
        # zero.Init, and as the teacher is never handed to DeepSpeed nothing would gather its weights
        with without_zero3_init():
            # it reads the student's batches, padded with the student's pad id
            model, new_modules = load_classifier(
                teacher_cfg, label_names, pad_token_id=student_tokenizer.pad_token_id
            )
        if new_modules:
            raise ConfigError(
                f"distill.teacher={cfg.distill.teacher} has no trained classification head for these labels "
                f"(newly initialised: {', '.join(new_modules)}); train one with model.mode=full"
            )
        self.model = model.to(device).eval().requires_grad_(False)

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], idx: torch.Tensor, want_hidden: bool
    ) -> TeacherOutput:
        return run_frozen(self.model, batch, want_hidden, self.cast)


class CachedTeacher:
    """Logits looked up by example id from a cache built for exactly this training data."""

    def __init__(
        self,
        cache_dir: Path,
        split_fingerprint: str,
        label_names: list[str],
        device: torch.device,
        long_text: dict[str, Any] | None = None,
    ) -> None:
        """`long_text`: the student's `LongText.record()`; the cache must have scored its documents the
        same way (a cache without the record truncated them)."""
        manifest = read_cache_manifest(cache_dir)
        split = manifest.get("splits", {}).get("train")
        cached = manifest.get("long_text", BEFORE)
        if long_text is not None and cached != long_text:
            raise DataError(
                f"teacher-logit cache {cache_dir} scored long texts with {cached}, this run with {long_text}: "
                "rebuild it with python -m scalelora.teacher_logits and the student's data settings"
            )
        if manifest.get("label_names") != list(label_names):
            raise DataError(
                f"teacher-logit cache {cache_dir} has labels {manifest.get('label_names')}, the data has {label_names}; rebuild it"
            )
        if not split or split.get("fingerprint") != split_fingerprint:
            raise DataError(
                f"teacher-logit cache {cache_dir} was built for other training data (fingerprint "
                f"{split and split.get('fingerprint')} != {split_fingerprint}); rebuild it with python -m scalelora.teacher_logits"
            )
        if not split.get("complete"):
            raise DataError(
                f"teacher-logit cache {cache_dir} is incomplete; rerun python -m scalelora.teacher_logits to finish it"
            )
        shards = [load_file(str(cache_dir / shard)) for shard in split["shards"]]
        ids = torch.cat([t["idx"].long() for t in shards])
        # ids are row numbers of the source split (kept through max_train_samples / keep_labels
        # filtering), so the table is as long as the largest id, not as the number of examples
        table = torch.full((int(ids.max()) + 1 if len(ids) else 0, len(label_names)), float("nan"))
        table[ids] = torch.cat([t["logits"].float() for t in shards])
        if (
            len(ids) != split["num_examples"]
            or len(torch.unique(ids)) != len(ids)
            or torch.isnan(table[ids]).any()
        ):
            raise DataError(
                f"teacher-logit cache {cache_dir} holds {len(ids)} rows for {split['num_examples']} training "
                "examples; rebuild it with python -m scalelora.teacher_logits --overwrite"
            )
        self.table = table.to(device)

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], idx: torch.Tensor, want_hidden: bool
    ) -> TeacherOutput:
        if want_hidden:
            raise ConfigError(
                "distill.hidden_weight needs hidden states: use distill.teacher=self or a model, not cache"
            )
        return TeacherOutput(self.table[idx])


class CalibratedTeacher:
    """Another teacher's logits divided by that teacher's fitted temperature (distill.calibrated_teacher)."""

    def __init__(self, inner: Any, temperature: float) -> None:
        self.inner = inner
        self.temperature = float(temperature)

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], idx: torch.Tensor, want_hidden: bool
    ) -> TeacherOutput:
        out = self.inner(model, batch, idx, want_hidden)
        return TeacherOutput(out.logits / self.temperature, out.pooled)


def model_folder_facts(name: str, label_names: list[str]) -> tuple[str | None, float | None]:
    """(problem type from config.json, fitted temperature from calibration.json) of a local model
    folder; (None, None) for a hub name. Raises CalibrationError for a calibration of other labels."""
    from scalelora.models import HF_PROBLEM_TYPES, resolve_model_path

    folder = Path(str(resolve_model_path(name)))
    if not folder.is_dir():
        return None, None
    problem = None
    config_file = folder / "config.json"
    if config_file.is_file():
        hf = json.loads(config_file.read_text()).get("problem_type")
        problem = next((ours for ours, theirs in HF_PROBLEM_TYPES.items() if theirs == hf), None)
    calibration = read_calibration(folder, label_names)
    return problem, calibration.temperature if calibration is not None else None


def check_teacher_problem(where: str, teacher_problem: str | None, problem_type: str) -> None:
    """Raise ConfigError when the teacher was trained for the other kind of problem (softmax vs sigmoid)."""
    if teacher_problem is not None and teacher_problem != problem_type:
        raise ConfigError(
            f"distill: the teacher {where} is a {teacher_problem} classifier but the data is {problem_type}; "
            "distil from a teacher trained on the same kind of labels"
        )


def read_cache_manifest(cache_dir: Path) -> dict[str, Any]:
    path = Path(cache_dir) / CACHE_MANIFEST
    if not path.is_file():
        raise DataError(
            f"{cache_dir} is not a teacher-logit cache (no {CACHE_MANIFEST}); build it with python -m scalelora.teacher_logits"
        )
    return json.loads(path.read_text())


def build_teacher(
    cfg: RunConfig,
    label_names: list[str],
    tokenizer: Any,
    train_fingerprint: str,
    device: torch.device,
    problem_type: str = "single_label",
) -> Any:
    """The teacher `distill.teacher` names (None without distillation), its logits divided by its fitted
    temperature with `distill.calibrated_teacher`. Raises ConfigError / DataError for a teacher of
    another problem type, labels or data, and for a calibrated teacher that has no temperature."""
    distill = cfg.distill
    if not distill.enabled:
        return None
    teacher: Any
    if distill.teacher == "cache":
        cache_dir = Path(distill.cache_dir or "")
        teacher = CachedTeacher(
            cache_dir, train_fingerprint, label_names, device, LongText.from_config(cfg.data).record()
        )
        manifest = read_cache_manifest(cache_dir)
        check_teacher_problem(
            f"of cache {cache_dir}", manifest.get("problem_type", "single_label"), problem_type
        )
        where, temperature = f"of cache {cache_dir} (its manifest.json)", manifest.get("teacher_temperature")
    else:
        name = cfg.model.name if distill.teacher == "self" else distill.teacher
        teacher = (
            SelfTeacher() if distill.teacher == "self" else ModelTeacher(cfg, label_names, tokenizer, device)
        )
        teacher_problem, temperature = model_folder_facts(name, label_names)
        check_teacher_problem(name, teacher_problem, problem_type)
        where = f"{name} (its calibration.json)"
    if not distill.calibrated_teacher:
        return teacher
    if temperature is None:
        raise ConfigError(
            f"distill.calibrated_teacher=true, but the teacher {where} records no fitted temperature; train the "
            "teacher with eval.calibrate=true (and rebuild a logits cache from it), or set distill.calibrated_teacher=false"
        )
    return CalibratedTeacher(teacher, temperature)
