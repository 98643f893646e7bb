"""What the loop measures while it runs: one step's counts (StepStats), wall seconds per phase
(PhaseTimer), steady-state throughput (ThroughputClock) and the sums behind each train log line
(MetricsWindow). Device counts stay tensors until read, so measuring never syncs the host on every step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from scalelora.runtime import peak_memory_bytes


@dataclass
class StepStats:
    """What one optimizer step consumed and produced. Tensors stay on the device until read."""

    loss: torch.Tensor
    """This rank's share of the step's objective (the shares of all ranks add up to it)."""
    tokens: torch.Tensor
    samples: int
    grad_norm: Any
    seconds: float
    padded_tokens: int = 0
    """Token positions including padding (input_ids elements), all ranks."""
    token_pairs: torch.Tensor | None = None
    """Sum over examples of (real length)^2, all ranks: the attention work of the step."""


class StepCounter:
    """What the micro-batches of one optimizer step held on this rank: examples, real tokens, token
    positions with padding, and the attention work (the sum of squared real lengths). Token counts stay
    on the device, as StepStats' do."""

    def __init__(self, device: torch.device) -> None:
        self.samples = self.padded = 0
        self.tokens = torch.zeros((), dtype=torch.long, device=device)
        self.pairs = torch.zeros((), dtype=torch.long, device=device)

    def add(self, labels: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        self.samples += int(labels.shape[0])
        if "attention_mask" in batch:
            lengths = batch["attention_mask"].sum(dim=1)
            self.tokens += lengths.sum()
            self.pairs += (lengths * lengths).sum()
            self.padded += batch["attention_mask"].numel()

    def stats(self, loss: torch.Tensor, grad_norm: Any, seconds: float, ranks: int) -> StepStats:
        """The step's StepStats, counts scaled to all `ranks` (every rank holds a batch of the same shape)."""
        return StepStats(
            loss=loss,
            tokens=self.tokens * ranks,
            samples=self.samples * ranks,
            grad_norm=grad_norm,
            seconds=seconds,
            padded_tokens=self.padded * ranks,
            token_pairs=self.pairs * ranks,
        )


def train_record(step: int, window: dict[str, Any], lr: float, steps_per_epoch: int) -> dict[str, Any]:
    """One `split: train` record of metrics.jsonl from a MetricsWindow reading."""
    return {
        "step": step,
        "split": "train",
        "loss": window["loss"],
        "lr": lr,
        "grad_norm": window["grad_norm"],
        "samples_per_second": window["samples_per_second"],
        "tokens_per_second": window["tokens_per_second"],
        "epoch": step / steps_per_epoch,
    }


def train_line(record: dict[str, Any], total_steps: int) -> str:
    """The log line of a train record: `step 10/100 loss=... lr=... grad_norm=... samples/s=...`."""
    norm_text = f"{record['grad_norm']:.3f}" if record["grad_norm"] is not None else "n/a"
    return (
        f"step {record['step']}/{total_steps} loss={record['loss']:.4f} lr={record['lr']:.2e} "
        f"grad_norm={norm_text} samples/s={record['samples_per_second']:.1f}"
    )


class PhaseTimer:
    """Wall seconds per phase of a run (`with phases("eval"): ...`). A phase entered inside another counts
    for itself only (a best-adapter save inside an evaluation is `save`), so the phases never overlap."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open phase: seconds spent in phases nested inside it

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            total = time.perf_counter() - started
            inner = self._inner.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + total - inner
            if self._inner:
                self._inner[-1] += total

    def read(self, startup: float | None) -> dict[str, float | None]:
        """Wall seconds of this process by phase, up to now (what the caller writes after reading, such as
        summary.json, report.md and the figures, is not in it): `startup` (given: process start to setup:
        interpreter, imports, config), then the trainer's phases, 0.0 for one not entered: `data`
        (tokenizer, loading, tokenizing), `model` (the rest of setup), `train` (the loop without
        evaluation and checkpoints), `eval` (every evaluation, calibration, sample predictions), `save`
        (checkpoints and adapter saves)."""
        phases: dict[str, float | None] = {"startup": startup}
        for name in ("data", "model", "train", "eval", "save"):
            phases[name] = self.seconds.get(name, 0.0)
        return phases


class ThroughputClock:
    """Steady-state throughput of the optimizer steps this process runs after its first `skip` (warm-up).

    The clock runs from the end of the last skipped step to the end of the last counted one, so data
    loading and logging are inside it; evaluation and checkpoint saves between steps (`paused`) are
    not. Samples, real tokens (attention-mask sums) and squared lengths stay device tensors, and the
    device is synchronized only at the window's edges and around pauses, never on every step.
    """

    def __init__(self, skip: int, device: torch.device) -> None:
        self.skip = skip
        self.device = device
        self.seen = 0
        self.steps = 0
        self.samples = 0
        self.padded_tokens = 0
        self.tokens = torch.zeros((), dtype=torch.long, device=device)
        self.token_pairs = torch.zeros((), dtype=torch.long, device=device)
        self.started = self._now() if skip == 0 else None
        self.ended: float | None = None
        self.paused_seconds = 0.0
        self._pending_pause = 0.0  # pauses after the last counted step count once another step follows
        self._step_just_ended = False
        self.peak_memory: dict[str, int | None] | None = None  # as the last counted step ended

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the queued work belongs before the stamp
        return time.perf_counter()

    def step_ended(self, stats: StepStats, last: bool) -> None:
        self.seen += 1
        if self.started is None:
            if self.seen == self.skip:
                self.started = self._now()
            return
        self.steps += 1
        self.samples += stats.samples
        self.padded_tokens += stats.padded_tokens
        self.tokens += stats.tokens
        if stats.token_pairs is not None:
            self.token_pairs += stats.token_pairs
        self.paused_seconds += self._pending_pause
        self._pending_pause = 0.0
        self.ended = self._now() if last else time.perf_counter()
        self._step_just_ended = True
        # the process's peak through this step (a getrusage call; on CUDA a host-side counter): training's
        # peak without the final evaluation, calibration and report that follow the loop
        self.peak_memory = peak_memory_bytes(self.device)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside the block is not training (evaluation, a checkpoint)."""
        if self.started is None:
            yield
            return
        began = self._now()
        if self._step_just_ended:
            self.ended = began  # the step's queued device work finished only now
            self._step_just_ended = False
        try:
            yield
        finally:
            self._pending_pause += time.perf_counter() - began

    def read(self) -> dict[str, Any] | None:
        """The steady-state numbers for summary.json; None when no step was counted."""
        if not self.steps or self.started is None or self.ended is None:
            return None
        seconds = max(self.ended - self.started - self.paused_seconds, 1e-9)
        tokens = int(self.tokens)
        return {
            "skipped_steps": self.skip,
            "steps": self.steps,
            "seconds": seconds,
            "samples": self.samples,
            "tokens": tokens,
            "padded_tokens": self.padded_tokens,
            "token_pairs": int(self.token_pairs),
            "samples_per_second": self.samples / seconds,
            "tokens_per_second": tokens / seconds,
            "step_seconds": seconds / self.steps,
            "padding_efficiency": tokens / max(self.padded_tokens, 1),
            "peak_memory_bytes": self.peak_memory,
        }


class MetricsWindow:
    """Sums over the optimizer steps since the last log line.

    Loss, example and token counts stay device tensors, so adding a step never syncs the host;
    `read` syncs once per log line, and `total_tokens` when a checkpoint needs the count.
    """

    def __init__(self, device: torch.device, tokens_before: int) -> None:
        self.device = device
        self.tokens_before = tokens_before
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.steps = 0
        self.tokens = torch.zeros((), dtype=torch.long, device=self.device)
        self.samples = 0
        self.grad_norm: Any = None
        self.started = time.perf_counter()

    def add(self, stats: StepStats) -> None:
        self.loss += stats.loss
        self.steps += 1
        self.tokens += stats.tokens
        self.samples += stats.samples
        self.grad_norm = stats.grad_norm

    def total_tokens(self) -> int:
        return self.tokens_before + int(self.tokens)

    def read(self, accelerator: Any) -> dict[str, Any]:
        """Mean objective over the window's steps (all ranks), last grad norm, samples/s and tokens/s;
        then restart it."""
        loss = self.loss
        if accelerator.num_processes > 1:
            loss = accelerator.reduce(loss.clone(), reduction="sum")
        seconds = max(time.perf_counter() - self.started, 1e-9)
        tokens = int(self.tokens)
        values = {
            "loss": float(loss) / max(self.steps, 1),
            "grad_norm": float(self.grad_norm) if self.grad_norm is not None else None,
            "samples_per_second": self.samples / seconds,
            "tokens_per_second": tokens / seconds,
        }
        self.tokens_before += tokens
        self.reset()
        return values
