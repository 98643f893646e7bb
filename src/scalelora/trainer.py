"""The training loop: one Trainer owning setup, train, train_step, evaluate, save. No HF Trainer.

Micro-batches come from one endless, seeded stream (epoch after epoch); each optimizer step takes
exactly `grad_accum` of them, so `global_step * grad_accum` is the stream position to resume from,
and Accelerate's counter-based `accumulate` always syncs on the last micro-batch of a step.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from scalelora import checkpoint as ckpt
from scalelora import data as data_lib
from scalelora.config import RunConfig, dump_yaml, to_dict
from scalelora.errors import CheckpointError, TrainingHalted, UserError
from scalelora.evaluation import evaluate_split
from scalelora.losses import count_valid, distillation_loss_sum, hidden_mse_sum
from scalelora.models import build_model, count_params, is_peft, load_tokenizer, max_positions
from scalelora.report import write_report
from scalelora.runtime import PREEMPTED_EXIT_CODE, StopSignal, build_accelerator, is_deepspeed
from scalelora.teacher import build_teacher, mean_pool
from scalelora.tracking import build_tracker, param_counts

# Keys of the config whose change makes an old checkpoint meaningless for this run.
RESUME_IDENTITY_KEYS = (
    "model.name",
    "model.mode",
    "lora.r",
    "lora.target_modules",
    "data.path",
    "data.keep_labels",
)
ARTIFACTS = (
    "checkpoints",
    "adapter",
    "model",
    "summary.json",
    "metrics.jsonl",
    "config.yaml",
    "report.md",
    "curves.png",
    # a fresh start must not continue the W&B run of the outputs it replaces
    "wandb_run_id.txt",
    "wandb_last_step.txt",
)


def deepspeed_summary(accelerator: Any) -> dict[str, Any] | None:
    """The DeepSpeed settings the run actually used (after Accelerate filled the "auto" values)."""
    if not is_deepspeed(accelerator):
        return None
    ds = accelerator.deepspeed_config
    zero = ds.get("zero_optimization", {})
    return {
        "zero_stage": zero.get("stage", 0),
        "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none"),
        "offload_param": zero.get("offload_param", {}).get("device", "none"),
        "train_micro_batch_size_per_gpu": ds.get("train_micro_batch_size_per_gpu"),
        "gradient_accumulation_steps": ds.get("gradient_accumulation_steps"),
        "gradient_clipping": ds.get("gradient_clipping"),
        "bf16": bool(ds.get("bf16", {}).get("enabled")),
        "fp16": bool(ds.get("fp16", {}).get("enabled")),
    }


def peak_memory_gb(device: torch.device) -> dict[str, float | None]:
    """Peak accelerator memory allocated by this (main) process, and its peak resident host memory."""
    import resource

    gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    return {"gpu": gpu, "host": host}


class Preempted(Exception):
    """Raised after a stop signal once a complete checkpoint is on disk; the CLI exits with PREEMPTED_EXIT_CODE."""

    exit_code = PREEMPTED_EXIT_CODE


@dataclass
class TrainState:
    """Everything besides Accelerate's state that a resumed run needs to continue exactly."""

    global_step: int = 0
    best_value: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    nonfinite_in_row: int = 0
    nonfinite_skipped: int = 0
    train_samples: int = 0
    train_tokens: int = 0
    step_seconds: float = 0.0
    wall_seconds: float = 0.0
    predictions_before: list[dict[str, Any]] = field(default_factory=list)
    identity: dict[str, Any] = field(default_factory=dict)


def dotted_get(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases and norm weights (all 1-D tensors) get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    head_names = ("classifier", "score", "pre_classifier")
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_head = any(f"{h}." in name or name.startswith(h) for h in head_names)
        groups.setdefault((is_head, no_decay(name, param)), []).append(param)
    param_groups = []
    for (is_head, skip_decay), params in groups.items():
        param_groups.append(
            {
                "params": params,
                "weight_decay": 0.0 if skip_decay else cfg.train.weight_decay,
                "lr": cfg.train.head_lr if (is_head and cfg.train.head_lr) else cfg.train.lr,
            }
        )
    if not param_groups:
        raise UserError("nothing to train: every parameter is frozen (check model.mode and model.train_head)")
    fused = torch.cuda.is_available() and all(
        p.is_cuda or not p.is_floating_point() for g in param_groups for p in g["params"]
    )
    return torch.optim.AdamW(param_groups, lr=cfg.train.lr, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, total_steps: int) -> Any:
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = (
        cfg.train.warmup_steps
        if cfg.train.warmup_steps is not None
        else int(cfg.train.warmup_ratio * total_steps)
    )
    if cfg.train.scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    factory = (
        get_cosine_schedule_with_warmup
        if cfg.train.scheduler == "cosine"
        else get_linear_schedule_with_warmup
    )
    return factory(optimizer, warmup, total_steps)


class Trainer:
    """Fine-tunes one classifier as `cfg` says. Use: `Trainer(cfg).setup(); trainer.train(); trainer.close()`."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        self.state = TrainState()
        self.stop_signal = StopSignal()
        self.lock = ckpt.RunLock(self.run_dir)
        self.tracker: Any = None
        self.accelerator: Any = None
        self.progress: Any = None
        self._pending_tokens: torch.Tensor | None = (
            None  # counted on device; read at log time (no sync per step)
        )

    # --- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        self.accelerator = build_accelerator(cfg)
        acc = self.accelerator
        resume_from = self._prepare_output_dir()
        self.log(
            f"scalelora: run {cfg.recipe or 'config'} -> {self.run_dir} ({acc.num_processes} process(es), {acc.distributed_type})"
        )

        self.tokenizer = load_tokenizer(cfg.model, cfg.data.truncation_side)
        error: UserError | None = None
        with acc.main_process_first():  # hub downloads happen once; others then read the cache
            try:
                self.splits = data_lib.load_splits(cfg.data, cfg.seed)
                self.tokenized = {
                    name: data_lib.tokenize_split(ds, self.tokenizer, cfg.data)
                    for name, ds in (
                        ("train", self.splits.train),
                        ("eval", self.splits.eval),
                        ("test", self.splits.test),
                    )
                    if ds is not None
                }
            except UserError as err:
                error = err  # raised after the barrier, so no rank waits forever
        if error is not None:
            raise error
        self.label_names = self.splits.label_names

        model = build_model(cfg.model, cfg.lora, self.label_names, device_map=self._device_map())
        data_lib.check_lengths(self.tokenized, max_positions(model, self.tokenizer), cfg.model.name)
        self.params = count_params(model)
        self.log(
            f"scalelora: {cfg.model.name} mode={cfg.model.mode} labels={self.label_names}; {self.params.line()}"
        )
        if cfg.train.compile:
            model = torch.compile(model)
        collate = data_lib.PadCollator(
            self.tokenizer.pad_token_id, pad_to_multiple_of=8 if cfg.train.compile else None
        )
        train_loader = data_lib.train_dataloader(
            self.tokenized["train"], cfg.data, cfg.train.batch_size, cfg.seed, collate
        )
        eval_loaders = {
            name: data_lib.eval_dataloader(
                self.tokenized[name], cfg.train.eval_batch_size, collate, cfg.data.num_workers
            )
            for name in ("eval", "test")
            if name in self.tokenized
        }
        optimizer = build_optimizer(model, cfg)
        # the schedule length needs the per-rank number of batches, known once the loader is sharded
        self.model, self.optimizer, self.train_loader = acc.prepare(model, optimizer, train_loader)
        self.eval_loaders = {name: acc.prepare_data_loader(loader) for name, loader in eval_loaders.items()}
        self.batches_per_epoch = len(self.train_loader)
        if cfg.train.max_steps:
            self.total_steps = cfg.train.max_steps
        else:
            self.total_steps = max(
                1, math.ceil(cfg.train.epochs * self.batches_per_epoch / cfg.train.grad_accum)
            )
        self.steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / cfg.train.grad_accum))
        self.scheduler = acc.prepare_scheduler(build_scheduler(self.optimizer, cfg, self.total_steps))
        if not is_deepspeed(acc):
            acc.register_save_state_pre_hook(ckpt.trainable_only_save_hook)

        self.teacher = build_teacher(
            cfg, self.label_names, self.tokenizer, self.splits.fingerprints["train"], acc.device
        )
        self.state.identity = {key: dotted_get(to_dict(cfg), key) for key in RESUME_IDENTITY_KEYS}
        self.state.identity["labels"] = self.label_names
        if resume_from is not None:
            self._resume(resume_from)
        self.tracker = build_tracker(cfg, acc.is_main_process, to_dict(cfg))
        self.tracker.summary(param_counts(self.params.trainable, self.params.total))
        if acc.is_main_process:
            ckpt.atomic_write_text(self.run_dir / "config.yaml", dump_yaml(cfg))
        if not self.state.predictions_before:
            self.state.predictions_before = self.sample_predictions()

    def _device_map(self) -> Any:
        if not (self.cfg.model.load_in_8bit or self.cfg.model.load_in_4bit):
            return None
        return {"": self.accelerator.device.index or 0} if self.accelerator.device.type == "cuda" else "cpu"

    def _prepare_output_dir(self) -> Path | None:
        """Take the run lock and decide where to resume from. Main process decides; every rank learns the answer."""
        acc, cfg = self.accelerator, self.cfg
        answer: list[Any] = [None]
        if acc.is_main_process:
            try:
                answer[0] = ("ok", self._claim_output_dir())
            except UserError as err:
                answer[0] = ("error", str(err), type(err).__name__)
        if acc.num_processes > 1:
            broadcast_object_list(answer, from_process=0)
        if answer[0][0] == "error":
            error_type = CheckpointError if answer[0][2] == "CheckpointError" else UserError
            raise error_type(answer[0][1])
        resume = answer[0][1]
        acc.wait_for_everyone()
        if resume is None and cfg.resume == "auto":
            self.log("scalelora: resume=auto found no complete checkpoint; starting fresh")
        return Path(resume) if resume else None

    def _claim_output_dir(self) -> str | None:
        cfg = self.cfg
        self.lock.acquire()
        try:
            if cfg.resume not in (None, "auto"):
                path = Path(cfg.resume)
                if not path.is_dir():
                    raise CheckpointError(
                        f"resume={cfg.resume}: no such checkpoint folder (use resume=auto to pick the newest)"
                    )
                try:
                    ckpt.verify_manifest(path)
                except CheckpointError as err:
                    raise CheckpointError(
                        f"{err}; resume from an earlier checkpoint, or use resume=auto (it skips damaged ones)"
                    ) from None
                return str(path)
            if cfg.resume == "auto":
                found = ckpt.latest_valid_checkpoint(self.ckpt_root, log=self.log)
                if found is None:
                    if (self.run_dir / "summary.json").exists() and not cfg.overwrite:
                        # never trade a finished run for a fresh start just because its checkpoints are gone
                        raise CheckpointError(
                            f"resume=auto: {self.run_dir} holds a finished run but no complete checkpoint to "
                            "resume from; pass overwrite=true to start over, or another output_dir"
                        )
                    self._clear_outputs()
                return str(found) if found else None
            existing = [name for name in ARTIFACTS if (self.run_dir / name).exists()]
            if existing and not cfg.overwrite:
                raise UserError(
                    f"output_dir {self.run_dir} already holds a run ({', '.join(existing)}); pass resume=auto to "
                    "continue it, overwrite=true to start over, or another output_dir"
                )
            self._clear_outputs()
            return None
        except BaseException:
            self.lock.release()
            raise

    def _clear_outputs(self) -> None:
        for name in ARTIFACTS:
            path = self.run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def _resume(self, path: Path) -> None:
        # compare identities before loading weights: another config's tensors would fail with a shape error
        identity = ckpt.read_trainer_state(path).get("identity", {})
        changed = [
            f"{k}: checkpoint {identity.get(k)!r}, now {v!r}"
            for k, v in self.state.identity.items()
            if identity.get(k) != v
        ]
        if changed:
            raise CheckpointError(
                f"checkpoint {path} is from another config ({'; '.join(changed)}); "
                "use its original config, or start over with overwrite=true or another output_dir"
            )
        saved = ckpt.load_checkpoint(self.accelerator, path)
        self.state = TrainState(**saved)
        self.log(f"scalelora: resumed from {path} at step {self.state.global_step}")
        self._trim_metrics(self.state.global_step)

    def _trim_metrics(self, step: int) -> None:
        """Drop metric lines logged after the checkpoint, so a resumed run never repeats or goes back in steps."""
        path = self.run_dir / "metrics.jsonl"
        if self.accelerator.is_main_process and path.is_file():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step
            ]
            ckpt.atomic_write_text(path, "".join(line + "\n" for line in kept))

    # --- the loop ------------------------------------------------------------------------------

    def micro_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The endless seeded stream, starting where `global_step` left it."""
        epoch, offset = divmod(self.state.global_step * self.cfg.train.grad_accum, self.batches_per_epoch)
        while True:
            self.train_loader.set_epoch(epoch)
            loader = (
                self.accelerator.skip_first_batches(self.train_loader, offset)
                if offset
                else self.train_loader
            )
            yield from loader
            epoch, offset = epoch + 1, 0

    def train(self) -> dict[str, Any]:
        cfg, acc, state = self.cfg, self.accelerator, self.state
        self.stop_signal.install()
        eval_every = cfg.eval.every or self.steps_per_epoch
        stream = self.micro_batches()
        progress = self.progress = tqdm(
            total=self.total_steps,
            initial=state.global_step,
            disable=not (acc.is_local_main_process and sys.stderr.isatty()),
            desc="train",
        )
        window = {
            "loss": torch.zeros((), device=acc.device),
            "count": torch.zeros((), device=acc.device),
            "grad_norm": 0.0,
        }
        started = time.perf_counter()
        window_started, window_samples, window_tokens = started, 0, state.train_tokens
        stop_early = False
        while state.global_step < self.total_steps and not stop_early:
            group = [next(stream) for _ in range(cfg.train.grad_accum)]
            step_started = time.perf_counter()
            stats = self.train_step(group)
            state.step_seconds += time.perf_counter() - step_started
            state.global_step += 1
            progress.update(1)
            window["loss"] += stats["loss_sum"]
            window["count"] += stats["count"]
            window["grad_norm"] = stats["grad_norm"]
            window_samples += stats["samples"]
            if state.global_step % cfg.train.log_every == 0 or state.global_step == self.total_steps:
                self._flush_token_count()
                now = time.perf_counter()
                seconds = max(now - window_started, 1e-9)
                self._log_train(
                    window, window_samples / seconds, (state.train_tokens - window_tokens) / seconds
                )
                window = {
                    "loss": torch.zeros((), device=acc.device),
                    "count": torch.zeros((), device=acc.device),
                    "grad_norm": 0.0,
                }
                window_started, window_samples, window_tokens = now, 0, state.train_tokens
            if state.global_step % eval_every == 0 or state.global_step == self.total_steps:
                stop_early = self._evaluate_and_track_best()
            if self.stop_signal.requested(acc):
                state.wall_seconds += time.perf_counter() - started
                path = self.save_checkpoint()
                progress.close()
                raise Preempted(
                    f"stopped by {self.stop_signal.signal_name or 'a signal on another rank'}; checkpoint {path}"
                )
            if cfg.checkpoint.every and state.global_step % cfg.checkpoint.every == 0:
                state.wall_seconds += time.perf_counter() - started
                started = time.perf_counter()
                self.save_checkpoint()
        progress.close()
        state.wall_seconds += time.perf_counter() - started
        if not (cfg.checkpoint.every and state.global_step % cfg.checkpoint.every == 0):
            self.save_checkpoint()
        return self.finish()

    def train_step(self, group: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches, the loss normalized by the global example count."""
        cfg, acc = self.cfg, self.accelerator
        self.model.train()
        local_count = sum(count_valid(b["labels"]) for b in group)
        global_count = (
            acc.reduce(local_count.clone(), reduction="sum") if acc.num_processes > 1 else local_count
        )
        # backward() divides by grad_accum and DDP averages over ranks; undo both so the gradient is
        # the sum over the global batch divided by its example count
        scale = acc.num_processes * cfg.train.grad_accum / global_count.clamp(min=1).float()
        loss_sum = torch.zeros((), device=acc.device)
        samples = 0
        tokens = torch.zeros((), dtype=torch.long, device=acc.device)
        grad_norm: Any = None
        for batch in group:
            labels, idx = batch.pop("labels"), batch.pop("idx")
            with acc.accumulate(self.model):
                loss, parts = self._loss(batch, labels, idx)
                acc.backward(loss * scale)
                loss_sum += parts["total"]
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(
                        self.model.parameters(), cfg.train.max_grad_norm or float("inf")
                    )
                    if self._finite_or_handle(loss_sum, grad_norm):
                        self.optimizer.step()
                        self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            samples += int(labels.shape[0])
            if "attention_mask" in batch:
                tokens += batch["attention_mask"].sum()
        self.state.train_samples += samples * acc.num_processes
        pending = tokens * acc.num_processes
        self._pending_tokens = pending if self._pending_tokens is None else self._pending_tokens + pending
        return {
            "loss_sum": loss_sum.detach(),
            "count": local_count,
            "grad_norm": grad_norm,
            "samples": samples * acc.num_processes,
        }

    def _loss(
        self, batch: dict[str, torch.Tensor], labels: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        distill = self.cfg.distill
        want_hidden = self.teacher is not None and distill.hidden_weight > 0
        teacher_out = self.teacher(self.model, batch, idx, want_hidden) if self.teacher is not None else None
        out = self.model(**batch, output_hidden_states=want_hidden)
        loss, parts = distillation_loss_sum(
            out.logits,
            labels,
            teacher_out.logits if teacher_out is not None else None,
            distill.weight,
            distill.temperature,
        )
        if want_hidden:
            student_pooled = mean_pool(out.hidden_states[-1], batch["attention_mask"])
            try:
                hidden = hidden_mse_sum(student_pooled, teacher_out.pooled, labels)
            except ValueError as err:
                raise UserError(
                    f"distill.hidden_weight: {err}; set distill.hidden_weight=0 for this teacher"
                ) from None
            loss = loss + distill.hidden_weight * hidden
            parts["hidden"] = hidden.detach()
        parts["total"] = loss.detach()
        return loss, parts

    def _finite_or_handle(self, loss_sum: torch.Tensor, grad_norm: Any) -> bool:
        """True when the step may go ahead. Grad norms are all-reduced, so every rank decides alike."""
        cfg, state = self.cfg, self.state
        finite = bool(torch.isfinite(loss_sum)) and (
            grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)))
        )
        if finite or (cfg.train.precision == "fp16" and bool(torch.isfinite(loss_sum))):
            state.nonfinite_in_row = 0  # an fp16 overflow is the grad scaler's to skip, not an error
            return True
        state.nonfinite_in_row += 1
        state.nonfinite_skipped += 1
        self.log(
            f"scalelora: warning: non-finite loss or gradient at step {state.global_step + 1}; step skipped"
        )
        if cfg.train.on_nonfinite == "stop" or state.nonfinite_in_row >= cfg.train.max_nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            path = self.save_checkpoint()
            raise TrainingHalted(
                f"non-finite loss or gradient at step {state.global_step + 1} ({state.nonfinite_in_row} in a row); "
                f"the last good state is saved in {path}; lower train.lr, use train.precision=bf16, or check the data"
            )
        return False

    def _log_train(
        self, window: dict[str, Any], samples_per_second: float, tokens_per_second: float | None = None
    ) -> None:
        acc = self.accelerator
        count = (
            acc.reduce(window["count"].clone(), reduction="sum") if acc.num_processes > 1 else window["count"]
        )
        loss = (
            acc.reduce(window["loss"].clone(), reduction="sum") if acc.num_processes > 1 else window["loss"]
        )
        norm = window["grad_norm"]
        record = {
            "step": self.state.global_step,
            "split": "train",
            "loss": float(loss / count.clamp(min=1)),
            "lr": float(self.scheduler.get_last_lr()[0]),
            "grad_norm": float(norm) if norm is not None else None,
            "samples_per_second": samples_per_second,
            "tokens_per_second": tokens_per_second,
            "epoch": self.state.global_step / self.steps_per_epoch,
        }
        self.write_metrics(record)
        self.tracker.log(
            {f"train/{k}": v for k, v in record.items() if k not in ("step", "split")}, step=record["step"]
        )
        norm_text = f"{record['grad_norm']:.3f}" if record["grad_norm"] is not None else "n/a"
        line = (
            f"step {record['step']}/{self.total_steps} loss={record['loss']:.4f} lr={record['lr']:.2e} "
            f"grad_norm={norm_text} samples/s={samples_per_second:.1f}"
        )
        if self.progress is not None and not self.progress.disable and sys.stderr.isatty():
            self.progress.set_postfix_str(line.split(" ", 2)[2])  # the bar already shows the step
        else:
            self.log(f"scalelora: {line}")  # job logs (SLURM, CI) get plain lines, not a redrawn bar

    # --- evaluation ----------------------------------------------------------------------------

    def evaluate(self, split: str = "eval") -> dict[str, Any]:
        return evaluate_split(self.accelerator, self.model, self.eval_loaders[split], self.label_names)

    def _evaluate_and_track_best(self) -> bool:
        """Evaluate, save the adapter when the metric improves; True when early stopping says stop."""
        cfg, state = self.cfg, self.state
        metrics = self.evaluate("eval")
        self._last_eval = (state.global_step, metrics)
        value = metrics[cfg.eval.metric]
        record = {
            "step": state.global_step,
            "split": "validation",
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
        }
        self.write_metrics(record)
        self.tracker.log(
            {
                "eval/accuracy": metrics["accuracy"],
                "eval/macro_f1": metrics["macro_f1"],
                "eval/ece": metrics.get("ece"),
            },
            step=state.global_step,
        )
        self.log(
            f"scalelora: step {state.global_step} validation accuracy={metrics['accuracy']:.4f} macro_f1={metrics['macro_f1']:.4f}"
        )
        if state.best_value is None or value > state.best_value:
            state.best_value, state.best_step = value, state.global_step
            state.evals_without_improvement = 0
            if cfg.eval.load_best_at_end:
                self.save_model()
            return False
        state.evals_without_improvement += 1
        patience = cfg.eval.early_stopping_patience
        if patience and state.evals_without_improvement >= patience:
            self.log(
                f"scalelora: early stopping at step {state.global_step} ({patience} evaluations without improvement)"
            )
            return True
        return False

    @torch.inference_mode()
    def sample_predictions(self) -> list[dict[str, Any]]:
        """Predictions for a fixed, seeded handful of validation texts (every rank runs the same forward)."""
        n = min(self.cfg.eval.sample_predictions, len(self.splits.eval))
        if n == 0:
            return []
        rows = self.splits.eval.shuffle(seed=self.cfg.seed).select(range(n))
        encoded = self.tokenizer(
            list(rows["text"]),
            list(rows["text_pair"]) if "text_pair" in rows.column_names else None,
            truncation=True,
            max_length=self.cfg.data.max_length,
            padding=True,
            return_tensors="pt",
        )
        model = self.model
        model.eval()
        logits = model(**{k: v.to(self.accelerator.device) for k, v in encoded.items()}).logits
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        out = []
        for i in range(n):
            pred = int(probs[i].argmax())
            out.append(
                {
                    "text": rows[i]["text"],
                    "gold": self.label_names[rows[i]["label"]],
                    "predicted": self.label_names[pred],
                    "confidence": float(probs[i, pred]),
                }
            )
        return out

    # --- saving --------------------------------------------------------------------------------

    def _flush_token_count(self) -> None:
        if self._pending_tokens is not None:
            self.state.train_tokens += int(self._pending_tokens)
            self._pending_tokens = None

    def save_checkpoint(self) -> Path:
        self._flush_token_count()
        state = dict(self.state.__dict__)
        return ckpt.save_checkpoint(
            self.accelerator, self.ckpt_root, self.state.global_step, state, self.cfg.checkpoint.keep_last
        )

    def save_model(self) -> Path:
        """adapter/ (LoRA) or model/ (full, head_only), loadable with PEFT / transformers alone."""
        cfg = self.cfg
        meta = {
            "scalelora.json": {
                "model_name": cfg.model.name,
                "mode": cfg.model.mode,
                "labels": self.label_names,
                "max_length": cfg.data.max_length,
                "step": self.state.global_step,
                "text_pair": cfg.data.text_pair_column is not None,
            },
            "labels.json": self.label_names,
        }
        peft_model = is_peft(self.accelerator.unwrap_model(self.model))
        target = self.run_dir / ("adapter" if peft_model else "model")
        ckpt.save_model_dir(
            self.accelerator, self.model, target, self.tokenizer, meta, cfg.lora.r if peft_model else None
        )
        return target

    def restore_best(self) -> None:
        """Load the weights saved at the best evaluation back into the model (for the final evaluation)."""
        from safetensors.torch import load_file

        unwrapped = self.accelerator.unwrap_model(self.model)
        if is_peft(unwrapped):
            from peft import set_peft_model_state_dict

            trainable = [p for p in unwrapped.parameters() if p.requires_grad]
            with ckpt.gathered_for_write(self.accelerator, trainable):  # ZeRO-3 shards are empty tensors
                set_peft_model_state_dict(
                    unwrapped, load_file(str(self.run_dir / "adapter" / "adapter_model.safetensors"))
                )
            return
        model_dir = self.run_dir / "model"
        # transformers 5 dropped modeling_utils.load_sharded_checkpoint: read the shards ourselves
        shards = sorted(model_dir.glob("model*.safetensors"))
        with ckpt.gathered_for_write(self.accelerator, unwrapped.parameters()):
            for shard in shards:
                unwrapped.load_state_dict(load_file(str(shard)), strict=False)

    # --- the end -------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        cfg, acc, state = self.cfg, self.accelerator, self.state
        self._flush_token_count()
        if cfg.eval.load_best_at_end and state.best_step is not None:
            acc.wait_for_everyone()
            self.restore_best()
        else:
            self.save_model()
        last = getattr(self, "_last_eval", None)
        if last is not None and last[0] == state.global_step and state.best_step in (None, state.global_step):
            # the weights are the ones just evaluated at this step: reuse, do not run validation twice
            final_eval = {"validation": last[1]}
        else:
            final_eval = {"validation": self.evaluate("eval")}
        if "test" in self.eval_loaders:
            final_eval["test"] = self.evaluate("test")
        after = self.sample_predictions()
        summary = self.build_summary(final_eval, after)
        if acc.is_main_process:
            ckpt.atomic_write_json(self.run_dir / "summary.json", summary)
            for split, metrics in final_eval.items():
                self.write_metrics(
                    {
                        "step": state.global_step,
                        "split": f"final_{split}",
                        "accuracy": metrics["accuracy"],
                        "macro_f1": metrics["macro_f1"],
                    }
                )
            write_report(self.run_dir, summary, log=self.log)
        self.tracker.log_final(summary)
        line = "  ".join(
            f"{split} accuracy={m['accuracy']:.4f} macro_f1={m['macro_f1']:.4f}"
            for split, m in final_eval.items()
        )
        self.log(
            f"scalelora: done in {state.wall_seconds:.1f}s ({summary['samples_per_second']:.1f} samples/s): {line}"
        )
        return summary

    def build_summary(self, final_eval: dict[str, Any], after: list[dict[str, Any]]) -> dict[str, Any]:
        import accelerate
        import peft
        import transformers

        cfg, state = self.cfg, self.state
        before = {row["text"]: row for row in state.predictions_before}
        samples = [
            {
                "text": row["text"],
                "gold": row["gold"],
                "before": before.get(row["text"], {}).get("predicted"),
                "before_confidence": before.get(row["text"], {}).get("confidence"),
                "after": row["predicted"],
                "after_confidence": row["confidence"],
            }
            for row in after
        ]
        return {
            "recipe": cfg.recipe,
            "model": cfg.model.name,
            "dataset": cfg.data.path,
            "data_source": self.splits.source,
            "mode": cfg.model.mode,
            "labels": self.label_names,
            "num_train_examples": len(self.splits.train),
            "dropped_empty": self.splits.dropped_empty,
            "trainable_params": self.params.trainable,
            "total_params": self.params.total,
            "trainable_pct": self.params.pct,
            "best": {"metric": cfg.eval.metric, "value": state.best_value, "step": state.best_step},
            "eval": final_eval,
            "global_step": state.global_step,
            "total_steps": self.total_steps,
            "samples_per_second": state.train_samples / max(state.step_seconds, 1e-9),
            "tokens_per_second": state.train_tokens / max(state.step_seconds, 1e-9),
            "train_seconds": state.wall_seconds,
            "nonfinite_skipped": state.nonfinite_skipped,
            "world_size": self.accelerator.num_processes,
            "precision": cfg.train.precision,
            "distributed_type": str(self.accelerator.distributed_type),
            "deepspeed": deepspeed_summary(self.accelerator),
            "peak_memory_gb": peak_memory_gb(self.accelerator.device),
            "seed": cfg.seed,
            "distill": to_dict(cfg)["distill"] if cfg.distill.enabled else None,
            "versions": {
                "scalelora": __import__("scalelora").__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "accelerate": accelerate.__version__,
                "python": sys.version.split()[0],
            },
            "sample_predictions": samples,
        }

    # --- output helpers ------------------------------------------------------------------------

    def write_metrics(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def log(self, message: str) -> None:
        if self.accelerator is None or self.accelerator.is_main_process:
            if self.progress is not None and not self.progress.disable:
                self.progress.write(message, file=sys.stderr)  # above the bar, not glued to it
            else:
                print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()  # ends the bar's line, so an error after it starts a line of its own
        self.stop_signal.uninstall()
        if self.tracker is not None:
            self.tracker.finish()
        self.lock.release()
        if self.accelerator is not None:
            self.accelerator.end_training()
