"""The training loop: one Trainer with setup, train, train_step. No HF Trainer.

Micro-batches come from one endless, seeded stream (epoch after epoch); each optimizer step takes
exactly `grad_accum` of them, so `global_step * grad_accum` is the stream position to resume from,
and Accelerate's counter-based `accumulate` always syncs on the last micro-batch of a step.

The loop owns no files: it asks the Checkpointer (`checkpoint.py`) when to save and where, leaves
evaluations and the weights they choose to the Evaluator (`evaluator.py`), and hands the summary to
`report.py`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from scalelora import data as data_lib
from scalelora import longtext, report
from scalelora.calibration import MULTI_LABEL
from scalelora.checkpoint import Checkpointer, resume_identity
from scalelora.config import AUTO_RECIPE, RunConfig, dump_yaml, to_dict
from scalelora.errors import TrainingHalted, UserError
from scalelora.evaluation import load_extra_metrics
from scalelora.evaluator import Evaluator
from scalelora.losses import (
    class_weight_sum,
    combine_loss,
    count_valid,
    hard_label_loss_sum,
    hidden_mse_sum,
    kd_kl_sum,
    kd_sigmoid_sum,
)
from scalelora.meters import (
    MetricsWindow,
    PhaseTimer,
    StepCounter,
    StepStats,
    ThroughputClock,
    train_line,
    train_record,
)
from scalelora.models import (
    ParamCount,
    count_params,
    finish_model,
    load_classifier,
    load_tokenizer,
    max_positions,
    untrained_head,
    use_mask_dropout,
)
from scalelora.optim import all_finite, build_optimizer, build_scheduler, nonfinite_reaches_gradients
from scalelora.runtime import (
    PREEMPTED_EXIT_CODE,
    StopSignal,
    accelerator_facts,
    build_accelerator,
    compiles,
    is_deepspeed,
    pins_memory,
    process_seconds,
    quantized_device_map,
    reset_accelerate_state,
    run_peak_memory,
    unwrap_model,
)
from scalelora.teacher import SelfTeacher, build_teacher, mean_pool
from scalelora.tracking import build_tracker, param_counts


class Preempted(Exception):
    """Raised after a stop signal once a complete checkpoint is on disk; the CLI exits with PREEMPTED_EXIT_CODE.
    `checkpoint` is that checkpoint's folder (RUN_DIR/checkpoints/step-N)."""

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, signal_name: str, checkpoint: Path):
        super().__init__(f"stopped by {signal_name}; checkpoint {checkpoint}")
        self.checkpoint = Path(checkpoint)


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
    resumed_at: list[int] = field(default_factory=list)  # the global step of each resume, in order


class Trainer:
    """Fine-tunes one classifier as `cfg` says. Use `run_training(cfg)`, or: `Trainer(cfg)`, `setup()`,
    `train()` (returns the summary), and `close()` in a `finally`.

    Its whole state is declared below, grouped by what sets it. An attribute without a default is
    always set there (read earlier, it fails loudly); one defaulting to None stays None until then, and
    for good where its part is off (no teacher, no class weights, no tuned rule). `echo` and `close`
    also run when setup failed half-way, so what they read defaults to None.
    """

    # __init__
    cfg: RunConfig
    state: TrainState
    stop_signal: StopSignal
    phases: PhaseTimer
    startup_seconds: float | None = None
    """The process's age when setup began: interpreter start-up, imports and config in a CLI run."""
    # setup: the run (_setup_run, _start_records)
    accelerator: Any = None
    checkpointer: Checkpointer | None = None
    extra_metrics: dict[str, Any]
    tracker: Any = None
    evaluator: Evaluator  # validation, the best weights, the final evaluation, sample predictions
    # setup: the data (_setup_data)
    tokenizer: Any
    splits: data_lib.Splits
    tokenized: dict[str, Any]
    label_names: list[str]
    problem_type: str
    multi_label: bool
    tune_metric: str | None = None  # what a decision rule is tuned for at each evaluation
    long_text: dict[str, Any] | None = None  # longtext.describe: None under data.long_text=truncate
    class_weights: torch.Tensor | None = None
    # setup: the model and what accelerate.prepare made of it (_setup_model, _setup_loaders, _prepare)
    model: torch.nn.Module
    params: ParamCount
    compiled: bool = False
    optimizer: Any  # Accelerate's or DeepSpeed's wrapper (step_was_skipped)
    scheduler: Any
    train_loader: Any
    train_sampler: Any  # its epoch decides the data order (see micro_batches)
    eval_loaders: dict[str, Any]
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    eval_every: int
    teacher: Any = None  # None without distillation
    # train
    progress: Any = None
    window: MetricsWindow
    throughput: ThroughputClock | None = None
    _clock: float  # perf_counter at the last snapshot, where wall_seconds counts on from

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.state = TrainState()
        self.stop_signal = StopSignal()
        self.phases = PhaseTimer()

    # --- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything `train` needs, in this order."""
        self.startup_seconds = process_seconds()
        # `model` holds all of setup but the data (timed inside): Accelerator, run folder, model, LoRA,
        # prepare, optimizer, teacher, tracker
        with self.phases("model"):
            resume_from = self._setup_run()
            self._setup_data()
            model = self._setup_model()
            self._prepare(model, *self._setup_loaders())
            self._setup_teacher()
            self._resume(resume_from)
            self._start_records()

    def _setup_run(self) -> Path | None:
        """The Accelerator, and the run folder claimed: returns the checkpoint to resume from (None: fresh)."""
        cfg = self.cfg
        acc = self.accelerator = build_accelerator(cfg)
        # before the output folder is touched: a metric that cannot load fails the run at once
        self.extra_metrics = load_extra_metrics(cfg.eval.extra_metrics, cfg.eval.trust_remote_code)
        self.checkpointer = Checkpointer(
            acc,
            cfg.run_dir,
            cfg.resume,
            cfg.overwrite,
            cfg.checkpoint.every,
            cfg.checkpoint.keep_last,
            echo=self.echo,
            trust_unsigned=cfg.checkpoint.trust_unsigned,
        )
        resume_from = self.checkpointer.claim()
        self.echo(
            f"scalelora: run {cfg.recipe or 'config'} -> {cfg.run_dir} ({acc.num_processes} process(es), {acc.distributed_type})"
        )
        return resume_from

    def _setup_data(self) -> None:
        """The tokenizer and the tokenized splits, then what the labels decide: the metric a decision
        rule is tuned for at each evaluation, and the class weights."""
        cfg = self.cfg
        with self.phases("data"):
            self.tokenizer = load_tokenizer(cfg.model, cfg.data.truncation_side)
            # cached once per machine when large (data.load_data); the `auto` recipe chooses in between
            choose = self._choose_from_data if cfg.recipe == AUTO_RECIPE else None
            self.splits, self.tokenized = data_lib.load_data(
                cfg, self.tokenizer, self.accelerator, self.echo, choose
            )
        # long documents (longtext.py): how many texts were cut, and how (summary.json `long_text`)
        long_text = longtext.LongText.from_config(cfg.data)
        self.long_text = longtext.describe(self.tokenized, long_text, self.tokenizer)
        for line in longtext.log_lines(self.long_text, long_text, self.tokenizer):
            self.echo(line)
        self.label_names = self.splits.label_names
        self.problem_type = self.splits.problem_type
        self.multi_label = self.problem_type == MULTI_LABEL
        tune = cfg.eval.tune_thresholds
        self.tune_metric = (
            ("macro_f1" if self.multi_label else None)
            if tune == "auto"
            else (None if tune == "none" else tune)
        )
        self.class_weights = data_lib.class_weight_tensor(
            cfg, self.label_names, self.splits, self.accelerator.device, self.echo
        )

    def _setup_model(self) -> torch.nn.Module:
        """The classifier as model.mode says, checked against the data's lengths and counted; not yet
        prepared. `prepare` compiles it when train.compile says (`runtime.dynamo_plugin`): compiled here,
        before it, DeepSpeed's engine and `save_state` would hold torch.compile's wrapper, and the
        checkpoint and adapter names would carry its `_orig_mod.` prefix."""
        cfg = self.cfg
        model, new_modules = load_classifier(
            cfg.model,
            self.label_names,
            quantized_device_map(cfg.model, self.accelerator.device),
            self.problem_type,
            self.tokenizer.pad_token_id,
        )
        if cfg.distill.enabled and cfg.distill.teacher == "self":
            SelfTeacher.check_base(cfg.model.name, untrained_head(model, new_modules))
        model = finish_model(model, new_modules, cfg.model, cfg.lora, self.echo)
        data_lib.check_lengths(self.tokenized, max_positions(model, self.tokenizer), cfg.model.name)
        self.params = count_params(model)
        self.echo(
            f"scalelora: {cfg.model.name} mode={cfg.model.mode} labels={self.label_names}; {self.params.line()}"
        )
        if cfg.train.mask_dropout and self.accelerator.device.type == "cpu":
            use_mask_dropout(model)
        self.compiled = compiles(self.accelerator)
        return model

    def _setup_loaders(self) -> tuple[Any, dict[str, Any]]:
        """The training loader and the evaluation loaders by split, not yet prepared (sharded)."""
        cfg = self.cfg
        collate = data_lib.PadCollator(
            self.tokenizer.pad_token_id, pad_to_multiple_of=8 if self.compiled else None
        )
        pin = pins_memory(self.accelerator.device)
        train_loader = data_lib.train_dataloader(
            self.tokenized["train"], cfg.data, cfg.train.batch_size, cfg.seed, collate, pin
        )
        self.train_sampler = train_loader.sampler  # its epoch decides the data order (see micro_batches)
        eval_loaders = {
            name: data_lib.eval_dataloader(
                self.tokenized[name], cfg.train.eval_batch_size, collate, cfg.data.num_workers, pin
            )
            for name in ("eval", "test")
            if name in self.tokenized
        }
        return train_loader, eval_loaders

    def _prepare(self, model: torch.nn.Module, train_loader: Any, eval_loaders: dict[str, Any]) -> None:
        """accelerate.prepare: the model, the optimizer and the loaders; then the schedule, whose length
        needs the per-rank number of batches, known once the loader is sharded."""
        cfg, acc = self.cfg, self.accelerator
        if is_deepspeed(acc):
            # DeepSpeed builds its engine from the model and the optimizer together
            optimizer = build_optimizer(model, cfg)
            self.model, self.optimizer, self.train_loader = acc.prepare(model, optimizer, train_loader)
        else:
            # the model first: prepare moves it to its device, and fused AdamW depends on that device
            self.model = acc.prepare(model)
            optimizer = build_optimizer(unwrap_model(self.model), cfg)
            self.optimizer, self.train_loader = acc.prepare(optimizer, train_loader)
        self.eval_loaders = {name: acc.prepare_data_loader(loader) for name, loader in eval_loaders.items()}
        self.batches_per_epoch = len(self.train_loader)
        self.steps_per_epoch = max(1, math.ceil(self.batches_per_epoch / cfg.train.grad_accum))
        self.total_steps = cfg.train.max_steps or max(
            1, math.ceil(cfg.train.epochs * self.batches_per_epoch / cfg.train.grad_accum)
        )
        self.eval_every = cfg.eval.every or self.steps_per_epoch
        self.scheduler = acc.prepare_scheduler(build_scheduler(self.optimizer, cfg, self.total_steps))
        if not is_deepspeed(acc):
            from scalelora.checkpoint import trainable_only_save_hook

            acc.register_save_state_pre_hook(trainable_only_save_hook)

    def _setup_teacher(self) -> None:
        self.teacher = build_teacher(
            self.cfg,
            self.label_names,
            self.tokenizer,
            self.splits.fingerprints["train"],
            self.accelerator.device,
            self.problem_type,
        )

    def _resume(self, resume_from: Path | None) -> None:
        """The run's resume identity; with a checkpoint, its state loaded into the prepared objects and
        the trainer state it saved."""
        self.state.identity = resume_identity(
            to_dict(self.cfg),
            self.label_names,
            self.accelerator.num_processes,
            self.splits.fingerprints["train"],
        )
        if resume_from is not None:
            self.state = TrainState(**self.checkpointer.resume(resume_from, self.state.identity))

    def _start_records(self) -> None:
        """The tracker, config.yaml, the evaluator, and the sample predictions before training (a resumed
        run keeps those of its first start)."""
        cfg, acc = self.cfg, self.accelerator
        self.tracker = build_tracker(cfg, acc.is_main_process, to_dict(cfg))
        self.tracker.set_summary(param_counts(self.params.trainable, self.params.total))
        self.checkpointer.write_text("config.yaml", dump_yaml(cfg))
        self.evaluator = Evaluator(
            cfg,
            acc,
            self.model,
            self.eval_loaders,
            self.tokenizer,
            self.splits,
            self.tune_metric,
            self.extra_metrics,
            self.checkpointer,
            self.tracker,
            self.phases,
            self.echo,
        )
        if not self.state.predictions_before:
            with self.phases("eval"):
                self.state.predictions_before = self.evaluator.sample_predictions()

    def _choose_from_data(self, splits: data_lib.Splits, sample: Any) -> None:
        """The `auto` recipe: the data-dependent settings (autoconfig.py), logged; the checkpointer, built
        before the data was read, takes the checkpoint interval chosen."""
        from scalelora import autoconfig

        for line in autoconfig.choose_from_data(
            self.cfg, splits, sample, self.tokenizer, self.accelerator.num_processes
        ):
            self.echo(line)
        self.checkpointer.every = self.cfg.checkpoint.every

    # --- the loop ------------------------------------------------------------------------------

    def micro_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """The endless seeded stream (`data.micro_batches`), from where `global_step` left it."""
        start = self.state.global_step * self.cfg.train.grad_accum
        return data_lib.micro_batches(
            self.accelerator, self.train_loader, self.train_sampler, start, self.batches_per_epoch
        )

    def train(self) -> dict[str, Any]:
        """Run optimizer steps until `total_steps` (or early stopping); return the run's summary."""
        cfg, state = self.cfg, self.state
        self.stop_signal.install()
        stream = self.micro_batches()
        self.progress = tqdm(
            total=self.total_steps,
            initial=state.global_step,
            disable=not (self.accelerator.is_local_main_process and sys.stderr.isatty()),
            desc="train",
        )
        window = self.window = MetricsWindow(self.accelerator.device, state.train_tokens)
        self._clock = time.perf_counter()
        last = state.global_step >= self.total_steps
        throughput = self.throughput = ThroughputClock(cfg.train.timing_skip_steps, self.accelerator.device)
        with self.phases("train"):
            while not last:
                stats = self.train_step([next(stream) for _ in range(cfg.train.grad_accum)])
                window.add(stats)
                state.global_step += 1
                self.progress.update(1)
                last = state.global_step == self.total_steps
                throughput.step_ended(stats, last)
                if state.global_step % cfg.train.log_every == 0 or last:
                    self.log_train(window.read(self.accelerator))
                if state.global_step % self.eval_every == 0 or last:
                    with self.between_steps("eval"):
                        last = self.evaluator.validate(state) or last  # early stopping ends the run here
                if self.stop_signal.requested(self.accelerator):
                    with self.between_steps("save"):
                        path = self.checkpointer.save(state.global_step, self.snapshot())
                    self.progress.close()
                    raise Preempted(self.stop_signal.signal_name or "a signal on another rank", path)
                self.checkpointer.maybe_save(
                    state.global_step, last, self.snapshot, around=lambda: self.between_steps("save")
                )
        self.progress.close()
        self.snapshot()
        return self.evaluate_best_and_report()

    @contextlib.contextmanager
    def between_steps(self, phase: str) -> Iterator[None]:
        """Evaluation or a checkpoint inside the loop: timed as `phase`, and left out of the steady-state
        throughput."""
        with self.phases(phase), self.throughput.paused():
            yield

    def snapshot(self) -> dict[str, Any]:
        """The trainer state as plain data, with the running clocks and token count brought up to date."""
        now = time.perf_counter()
        self.state.wall_seconds += now - self._clock
        self._clock = now
        self.state.train_tokens = self.window.total_tokens()
        return dict(self.state.__dict__)

    def train_step(self, group: list[dict[str, torch.Tensor]]) -> StepStats:
        """One optimizer step over `grad_accum` micro-batches, the loss normalized by the global example count."""
        cfg, acc = self.cfg, self.accelerator
        deepspeed = is_deepspeed(acc)
        started = time.perf_counter()
        self.model.train()
        # the example count and the class-weight sum of the whole global batch, in one all-reduce
        local = torch.stack(
            [
                sum(count_valid(b["labels"]) for b in group).float(),
                sum(class_weight_sum(b["labels"], self.class_weights) for b in group),
            ]
        )
        totals = acc.reduce(local.clone(), reduction="sum") if acc.num_processes > 1 else local
        # backward() divides by grad_accum and DDP averages over ranks; undo both, so the gradient is
        # that of the global batch's objective (losses.combine_loss)
        scale = acc.num_processes * cfg.train.grad_accum
        objective = torch.zeros((), device=acc.device)
        counter = StepCounter(acc.device)
        grad_norm: Any = None
        for batch in group:
            labels, idx = batch.pop("labels"), batch.pop("idx")
            with acc.accumulate(self.model):
                loss, parts = self.compute_loss(batch, labels, idx, (totals[1], totals[0]))
                if deepspeed:
                    loss = nonfinite_reaches_gradients(loss)
                acc.backward(loss * scale)
                objective += parts["total"]
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(
                        self.model.parameters(), cfg.train.max_grad_norm or float("inf")
                    )
                    self.finish_step(objective, grad_norm)
                    self.optimizer.zero_grad(set_to_none=True)
            counter.add(labels, batch)
        seconds = time.perf_counter() - started
        stats = counter.stats(objective.detach(), grad_norm, seconds, acc.num_processes)
        self.state.train_samples += stats.samples
        self.state.step_seconds += seconds
        return stats

    def compute_loss(
        self,
        batch: dict[str, torch.Tensor],
        labels: torch.Tensor,
        idx: torch.Tensor,
        totals: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch's share of the objective (`losses.combine_loss`) and its parts as sums.

        `totals` is (sum of class weights, example count) over the whole global batch; by default
        this micro-batch's own, which makes the returned loss that of the micro-batch alone.
        """
        cfg, distill = self.cfg, self.cfg.distill
        want_hidden = self.teacher is not None and distill.hidden_weight > 0
        # long documents (data.long_text=chunk): the loss is over documents, their windows pooled
        windows = longtext.Windows(batch.pop(longtext.DOC, None), labels.shape[0], cfg.data.chunk_pool)
        teacher_out = self.teacher(self.model, batch, idx, want_hidden) if self.teacher is not None else None
        out = self.model(**batch, output_hidden_states=want_hidden)
        logits = windows.logits(out.logits)
        if teacher_out is not None:  # a model teacher's logits are per window (a cache's per document)
            teacher_out.logits = windows.logits(teacher_out.logits)
        hard, weight = hard_label_loss_sum(
            logits,
            labels,
            self.class_weights,
            focal_gamma=cfg.train.focal_gamma if cfg.train.loss == "focal" else None,
            label_smoothing=cfg.train.label_smoothing,
        )
        parts = {"hard": hard.detach(), "weight": weight.detach()}
        kd = hidden = None
        if teacher_out is not None:
            kd_sum = kd_sigmoid_sum if self.multi_label else kd_kl_sum
            kd = kd_sum(logits, teacher_out.logits, distill.temperature, labels)
            parts["kd"] = kd.detach()
        if want_hidden:
            student_pooled = windows.rows(mean_pool(out.hidden_states[-1], batch["attention_mask"]))
            teacher_pooled = windows.rows(teacher_out.pooled)
            try:
                hidden = hidden_mse_sum(student_pooled, teacher_pooled, labels)
            except ValueError as err:
                raise UserError(
                    f"distill.hidden_weight: {err}; set distill.hidden_weight=0 for this teacher"
                ) from None
            parts["hidden"] = hidden.detach()
        weight_total, count_total = totals if totals is not None else (weight, count_valid(labels).float())
        loss = combine_loss(
            hard, weight_total, count_total, kd, distill.weight, hidden, distill.hidden_weight
        )
        parts["total"] = loss.detach()
        return loss, parts

    def finish_step(self, objective: torch.Tensor, grad_norm: Any) -> None:
        """Step the optimizer and the schedule, or skip a non-finite step (and stop after too many).

        Every rank takes the same decision: the loss flag is all-reduced (each rank sees only its own
        loss) and the gradient norm already is. An fp16 overflow (finite loss, infinite gradients) is
        the loss scaler's to skip, not an error. The schedule steps only when the optimizer really
        stepped: not when the scaler or DeepSpeed skipped it, nor on a skipped non-finite step.

        Under DeepSpeed the engine has already stepped inside `backward`, or discarded the step when
        its overflow check found a non-finite gradient, which a non-finite loss always makes
        (`nonfinite_reaches_gradients`); the skip here then only counts it.

        Raises TrainingHalted after saving the last good state (train.on_nonfinite=stop, or
        train.max_nonfinite non-finite steps in a row), or without saving when DeepSpeed applied a
        non-finite step.
        """
        cfg, acc = self.cfg, self.accelerator
        loss_finite = all_finite(acc, objective)
        grads_finite = grad_norm is None or math.isfinite(float(grad_norm))
        if loss_finite and (grads_finite or cfg.train.precision == "fp16"):
            scaler = acc.scaler
            scale = scaler.get_scale() if scaler is not None else None
            self.optimizer.step()
            # an optimizer that handles the scaler's inf check itself (fused AdamW:
            # `_step_supports_amp_scaling`) is always called, so Accelerate's step_was_skipped stays
            # False on an overflow; the scaler's update() lowering the scale is what marks the skip
            overflow = scale is not None and scaler.get_scale() < scale
            if not (self.optimizer.step_was_skipped or overflow):
                self.scheduler.step()
            self.state.nonfinite_in_row = 0
            return
        if is_deepspeed(acc) and not self.optimizer.step_was_skipped:
            # the engine steps inside backward; nonfinite_reaches_gradients makes its overflow check
            # discard such a step, so this means that check is off: the update cannot be taken back
            raise TrainingHalted(
                f"non-finite loss or gradient at step {self.state.global_step + 1}, and DeepSpeed applied that "
                "step (its overflow check did not discard it; bf16.check_grad_overflow=false?): the weights are "
                "no longer the last good ones, so nothing was saved; resume from the newest checkpoint with "
                "resume=auto, and lower train.lr or check the data"
            )
        if acc.scaler is not None:
            # clip_grad_norm_ unscaled this step's gradients; without update() the scaler still holds
            # that, and the next step's unscale_ would fail ("already been called")
            acc.scaler.update()
        self.skip_nonfinite()

    def skip_nonfinite(self) -> None:
        """Count a skipped non-finite step; save the last good state and raise TrainingHalted when the
        config says to stop."""
        cfg, state = self.cfg, self.state
        state.nonfinite_in_row += 1
        state.nonfinite_skipped += 1
        self.echo(
            f"scalelora: warning: non-finite loss or gradient at step {state.global_step + 1}; step skipped"
        )
        if cfg.train.on_nonfinite == "stop" or state.nonfinite_in_row >= cfg.train.max_nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            path = self.checkpointer.save(state.global_step, self.snapshot())
            raise TrainingHalted(
                f"non-finite loss or gradient at step {state.global_step + 1} ({state.nonfinite_in_row} in a row); "
                f"the last good state is saved in {path}; lower train.lr, use train.precision=bf16, or check the data"
            )

    def log_train(self, window: dict[str, Any]) -> None:
        """One train record: metrics.jsonl, W&B, and a log line (or the progress bar's postfix)."""
        lr = float(self.scheduler.get_last_lr()[0])
        record = train_record(self.state.global_step, window, lr, self.steps_per_epoch)
        self.checkpointer.append_metrics(record)
        self.tracker.log_metrics(
            {f"train/{k}": v for k, v in record.items() if k not in ("step", "split")}, step=record["step"]
        )
        line = train_line(record, self.total_steps)
        if self.progress is not None and not self.progress.disable and sys.stderr.isatty():
            self.progress.set_postfix_str(line.split(" ", 2)[2])  # the bar already shows the step
        else:
            self.echo(f"scalelora: {line}")  # job logs (SLURM, CI) get plain lines, not a redrawn bar

    # --- the end -------------------------------------------------------------------------------

    def evaluate_best_and_report(self) -> dict[str, Any]:
        """The final evaluation (`Evaluator.final`) and the sample predictions after training, then
        summary.json, the final records in metrics.jsonl, report.md and W&B's summary."""
        cfg, state = self.cfg, self.state
        final_eval = self.evaluator.final(state)
        with self.phases("eval"):
            after = self.evaluator.sample_predictions()
        summary = report.build_summary(cfg, dict(state.__dict__), self.run_facts(), final_eval, after)
        self.checkpointer.write_summary(summary)
        self.evaluator.log_final(state.global_step, final_eval)
        if self.accelerator.is_main_process:
            report.write_report(cfg.run_dir, summary, log=self.echo)
        self.tracker.log_final(summary)
        self.echo(f"scalelora: done in {state.wall_seconds:.1f}s {report.final_line(summary)}")
        return summary

    def run_facts(self) -> dict[str, Any]:
        """What the summary reports beyond the config and the trainer state."""
        calibration, weights = self.evaluator.calibration, self.class_weights
        return {
            "data_source": self.splits.source,
            "labels": self.label_names,
            "problem_type": self.problem_type,
            "calibration": calibration.to_json() if calibration is not None else None,
            "num_train_examples": len(self.splits.train),
            "dropped_empty": self.splits.dropped_empty,
            "truncated": self.splits.truncated,
            "long_text": self.long_text,
            "params": self.params,
            "total_steps": self.total_steps,
            **accelerator_facts(self.accelerator),
            "class_weights": dict(zip(self.label_names, weights.tolist())) if weights is not None else None,
            "compiled": self.compiled,
            "steady_state": self.throughput.read() if self.throughput is not None else None,
            "phase_seconds": self.phases.read(self.startup_seconds),
        }

    # --- output helpers ------------------------------------------------------------------------

    def echo(self, message: str) -> None:
        """Print a log line on the main process (above the progress bar when one is drawn)."""
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
            self.tracker.close()
        if self.checkpointer is not None:
            self.checkpointer.release()
        if self.accelerator is not None:
            self.accelerator.end_training()


def run_training(cfg: RunConfig) -> dict[str, Any]:
    """Train as `cfg` says and return the summary (what summary.json holds).

    The one way to run a training: the CLI, the pipeline, the benchmark and the tests use it. It
    starts and ends with Accelerate's process-wide state reset, so runs with other precision,
    accumulation or DeepSpeed settings can follow each other in one process. Raises UserError
    (bad config or data), TrainingHalted, or Preempted (a checkpoint is on disk).
    """
    reset_accelerate_state()
    trainer = Trainer(cfg)
    with run_peak_memory():  # the summary's peaks are this run's, not an earlier one's in the process
        try:
            trainer.setup()
            return trainer.train()
        finally:
            trainer.close()
            reset_accelerate_state()
