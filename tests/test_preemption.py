"""Stop signals outside SLURM: a SIGTERM to a local `accelerate launch` (torchrun forwards it) stops
a running 2-process CPU training, every rank at the same step with a complete checkpoint, and
`resume=auto` finishes with the adapter of an uninterrupted run, in the same W&B run. The chain
through the scheduler (`slurm/preemptible.sbatch`: USR1, checkpoint, requeue, resume) runs on a real
SLURM cluster in tests/test_slurm_cluster.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, accelerate_launch, read_summary, run_cli, tiny_overrides
from scalelora.checkpoint import checkpoint_dirs, verify_manifest
from scalelora.runtime import PREEMPTED_EXIT_CODE
from scalelora.tracking import RUN_ID_FILE

pytestmark = pytest.mark.slow

# long enough that the signal lands mid-training, one evaluation, final weights saved as the adapter
RUN = {
    "train.max_steps": 200,
    "eval.every": 200,
    "eval.load_best_at_end": "false",
    "eval.sample_predictions": 2,
    "lora.dropout": 0.0,
}


def start(command: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def wait_for_training(job: subprocess.Popen, out: Path, timeout: float = 300) -> None:
    """Until the first train log line (step 2) is written: the signal handlers are installed by then."""
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and '"split": "train"' in metrics.read_text()):
        assert job.poll() is None, f"the run ended before training (exit {job.returncode})"
        assert time.monotonic() < deadline, "training did not start in time"
        time.sleep(0.05)


def train_command(tiny_bert, toy_data, out: Path, launcher: list[str] | None, *extra: str) -> list[str]:
    args = [
        "-m",
        "scalelora.train",
        "--config",
        "quickstart",
        *tiny_overrides(tiny_bert, toy_data, out, **RUN),
        *extra,
    ]
    return [*(launcher or [sys.executable]), *args]


def only_checkpoint(out: Path) -> tuple[Path, int]:
    found = checkpoint_dirs(out / "checkpoints")
    assert len(found) == 1, found
    verify_manifest(found[0])  # complete: every file present with its checksum
    step = json.loads((found[0] / "trainer_state.json").read_text())["global_step"]
    assert found[0].name == f"step-{step}" and 0 < step < RUN["train.max_steps"]
    return found[0], step


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert, toy_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preempt") / "full"
    result = run_cli(
        "scalelora.train",
        ["--config", "quickstart", *tiny_overrides(tiny_bert, toy_data, out, **RUN)],
        launcher=accelerate_launch(2, "cpu_2proc.yaml"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_sigterm_to_the_launcher_checkpoints_every_rank_and_resume_matches(
    tiny_bert, toy_data, tmp_path, uninterrupted
):
    """A `kill` of a local launch: SIGTERM to the launcher, which torchrun forwards to every rank."""
    out = tmp_path / "preempted"
    wandb = ["tracking.report_to=wandb", "tracking.wandb.mode=offline"]
    job = start(
        train_command(tiny_bert, toy_data, out, accelerate_launch(2, "cpu_2proc.yaml"), *wandb),
        tmp_path / "a.log",
    )
    wait_for_training(job, out)
    job.send_signal(signal.SIGTERM)
    assert (
        job.wait(timeout=120) != 0
    )  # torchrun reports stopped workers as a failure; the sbatch trap knows better
    log = (tmp_path / "a.log").read_text()
    path, step = only_checkpoint(out)
    assert log.count(f"stopped by SIGTERM; checkpoint {path}") == 2, log[-2000:]  # both ranks, same step
    assert not (out / "summary.json").exists()
    run_id = (out / RUN_ID_FILE).read_text().strip()

    result = run_cli(
        "scalelora.train",
        ["--config", "quickstart", *tiny_overrides(tiny_bert, toy_data, out, **RUN), *wandb, "resume=auto"],
        launcher=accelerate_launch(2, "cpu_2proc.yaml"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {path} at step {step}" in result.stderr
    assert read_summary(out)["global_step"] == RUN["train.max_steps"]
    assert (out / RUN_ID_FILE).read_text().strip() == run_id  # the same W&B run continues
    full, resumed = adapter(uninterrupted), adapter(out)
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps))  # no step logged twice across the preemption


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tiny_bert, toy_data, tmp_path):
    """The flag is all-reduced each step, so the rank that got no signal neither runs on nor deadlocks."""
    out = tmp_path / "one-rank"
    job = start(
        train_command(tiny_bert, toy_data, out, accelerate_launch(2, "cpu_2proc.yaml")), tmp_path / "b.log"
    )
    wait_for_training(job, out)
    workers = [
        p
        for p in psutil.Process(job.pid).children(recursive=True)
        if "scalelora.train" in " ".join(p.cmdline())
    ]
    assert len(workers) == 2
    workers[-1].send_signal(signal.SIGUSR1)
    job.wait(timeout=120)
    log = (tmp_path / "b.log").read_text()
    path, _ = only_checkpoint(out)
    assert f"stopped by SIGUSR1; checkpoint {path}" in log
    assert f"stopped by a signal on another rank; checkpoint {path}" in log


def test_a_single_process_run_exits_with_the_preempted_code(tiny_bert, toy_data, tmp_path):
    out = tmp_path / "single"
    job = start(train_command(tiny_bert, toy_data, out, None), tmp_path / "c.log")
    wait_for_training(job, out)
    job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=120) == PREEMPTED_EXIT_CODE == 75
    path, _ = only_checkpoint(out)
    assert f"checkpoint {path}; resume with resume=auto" in (tmp_path / "c.log").read_text()
