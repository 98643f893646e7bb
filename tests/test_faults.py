"""Faults injected into real runs: kill -9 anywhere, corrupt checkpoints, a full disk, NaN losses,
two runs in one output_dir, SIGTERM. Nothing finished is lost; nothing partial is ever resumed."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from fault_inject import POINTS, run_forked
from scalelora import checkpoint as ckpt

KILL_SEED = 20261125
N_KILLS = 10


def kill_args(model: Path, data: Path, out: Path, **extra: object) -> list[str]:
    settings = {"checkpoint.every": 1, "checkpoint.keep_last": 2, "train.max_steps": 6, "eval.every": 2}
    settings.update(extra)
    return ["--config", "quickstart", *tiny_overrides(model, data, out, **settings)]


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        torch.testing.assert_close(
            a[name], b[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{what}: {n}: {m}"
        )


def assert_newest_complete_checkpoint_loads(out: Path) -> Path | None:
    """The checkpoint resume=auto would pick verifies and every file in it loads."""
    newest = ckpt.latest_valid_checkpoint(out / "checkpoints", log=lambda message: None)
    if newest is None:
        return None
    ckpt.verify_manifest(newest)
    for weights in newest.glob("*.safetensors"):
        load_file(str(weights))
    assert isinstance(ckpt.read_trainer_state(newest)["global_step"], int)
    return newest


@pytest.fixture(scope="module")
def reference(tiny_bert: Path, toy_data: Path, tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """An uninterrupted run, and how often it reached each fault point."""
    out = tmp_path_factory.mktemp("reference") / "out"
    counts = out.parent / "counts.json"
    code = run_forked(
        kill_args(tiny_bert, toy_data, out), count_file=str(counts), log=str(out.parent / "log")
    )
    assert code == 0, (out.parent / "log").read_text()[-3000:]
    return out, json.loads(counts.read_text())


def test_kill_9_at_seeded_points_then_resume_gives_the_uninterrupted_adapter(
    reference, tiny_bert: Path, toy_data: Path, tmp_path: Path
):
    ref_out, counts = reference
    expected = adapter_tensors(ref_out)
    rng = random.Random(KILL_SEED)
    reachable = sorted(point for point in POINTS if counts.get(point))
    # each named point once, then seeded random (point, call) pairs over every call a run makes
    plan = [(point, rng.randint(1, counts[point])) for point in reachable]
    while len(plan) < N_KILLS:
        point = rng.choice(reachable)
        plan.append((point, rng.randint(1, counts[point])))
    for i, (point, n) in enumerate(plan):
        out = tmp_path / f"kill-{i}-{point}-{n}"
        log = str(out.parent / f"{out.name}.log")
        args = kill_args(tiny_bert, toy_data, out, resume="auto")
        code = run_forked(args, faults=[f"{point}:{n}:kill"], log=log)
        assert code == -9, f"{point}:{n} did not kill the run (exit {code}): {Path(log).read_text()[-2000:]}"
        newest = assert_newest_complete_checkpoint_loads(out)
        code = run_forked(args, log=log)
        text = Path(log).read_text()
        assert code == 0, f"resume after kill at {point}:{n} failed: {text[-3000:]}"
        if newest is not None:
            assert f"resumed from {newest}" in text, text[-2000:]
        assert_same_tensors(adapter_tensors(out), expected, f"kill at {point}:{n}")
        summary = json.loads((out / "summary.json").read_text())
        assert summary["global_step"] == 6
