"""Faults injected into real runs: kill -9 anywhere, corrupt checkpoints, a full disk, NaN losses,
two runs in one output_dir, SIGTERM. Nothing finished is lost; nothing partial is ever resumed."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, accelerate_launch, tiny_overrides
from fault_inject import POINTS, forked_context, run_forked
from fault_inject import _child as fault_child
from scalelora import checkpoint as ckpt

KILL_SEED = 20261125


def kill_args(model: Path, data: Path, out: Path, **extra: object) -> list[str]:
    settings = {"checkpoint.every": 1, "checkpoint.keep_last": 2, "train.max_steps": 6, "eval.every": 2}
    settings.update(extra)
    return ["--config", "quickstart", *tiny_overrides(model, data, out, **settings)]


def forked_process(argv: list[str], faults: list[str], log: Path) -> object:
    """Start a trainer child without waiting for it."""
    process = forked_context().Process(target=fault_child, args=(argv, faults, None, str(log)))
    process.start()
    return process


def wait_for(condition: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.1)


def error_lines(text: str) -> list[str]:
    """The `scalelora: error:` lines as a terminal shows them (a progress bar ends its lines with \\r)."""
    return [line for line in re.split(r"[\r\n]", text) if line.startswith("scalelora: error:")]


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


def kill_plan(counts: dict[str, int]) -> list[tuple[str, int]]:
    """Every injection point, each at a seeded random call among the calls an uninterrupted run makes."""
    rng = random.Random(KILL_SEED)
    return [(point, rng.randint(1, counts[point])) for point in sorted(POINTS)]


def test_every_documented_kill_point_is_reached_and_planned(reference):
    _, counts = reference
    unreached = sorted(point for point in POINTS if not counts.get(point))
    assert not unreached, (
        f"an uninterrupted run never reaches {unreached}: the kill test could not exercise them"
    )
    assert {point for point, _ in kill_plan(counts)} == set(POINTS)
    doc = (ROOT / "docs" / "reliability.md").read_text()
    assert f"at each of the {len(POINTS)} injection points" in doc


def test_kill_9_at_every_point_then_resume_gives_the_uninterrupted_adapter(
    reference, tiny_bert: Path, toy_data: Path, tmp_path: Path
):
    ref_out, counts = reference
    expected = adapter_tensors(ref_out)
    plan = kill_plan(counts)
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


# --- checkpoints corrupted on disk ------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for offset in (len(data) // 3, len(data) // 2, len(data) - 5):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def remove(path: Path) -> None:
    path.unlink()


CORRUPTIONS = [
    ("truncated", "model.safetensors", truncate, "bytes, the manifest says"),
    ("flipped", "optimizer.bin", flip_bytes, "does not match its checksum"),
    ("missing", "trainer_state.json", remove, "is missing from the checkpoint"),
]


@pytest.mark.parametrize(
    ("kind", "victim", "damage", "message"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS]
)
def test_corrupt_checkpoint_is_named_and_resume_auto_falls_back(
    kind, victim, damage, message, reference, tiny_bert, toy_data, tmp_path
):
    ref_out, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    newest, previous = ckpt.checkpoint_dirs(out / "checkpoints")[-2:][::-1]
    damage(newest / victim)
    log = tmp_path / "log"

    # resume=PATH to the damaged checkpoint: one line naming the file, nothing changed
    args = kill_args(tiny_bert, toy_data, out, resume=newest)
    assert run_forked(args, log=str(log)) == 2
    errors = error_lines(log.read_text())
    assert len(errors) == 1 and str(newest / victim) in errors[0] and message in errors[0], errors
    assert "Traceback" not in log.read_text()

    # resume=auto: says which checkpoint it skips and why, and picks the previous one
    warnings: list[str] = []
    assert ckpt.latest_valid_checkpoint(out / "checkpoints", log=warnings.append) == previous
    assert len(warnings) == 1 and f"skipping checkpoint {newest.name}" in warnings[0], warnings
    assert str(newest / victim) in warnings[0] and "falling back to the previous one" in warnings[0]
    if kind != "truncated":
        return  # the same fallback as below; one full resume is enough
    log.write_text("")
    assert run_forked(kill_args(tiny_bert, toy_data, out, resume="auto"), log=str(log)) == 0, log.read_text()[
        -3000:
    ]
    text = log.read_text()
    assert warnings[0] in text and f"resumed from {previous}" in text, text[-2000:]
    assert_same_tensors(adapter_tensors(out), adapter_tensors(ref_out), f"resume after a {kind} checkpoint")
    ckpt.verify_manifest(newest)  # written again by the resumed run


# --- a full disk -------------------------------------------------------------------------------------


# the 3rd checkpoint's weights file, or its optimizer state (3 torch.save files per checkpoint)
@pytest.mark.parametrize(
    "fault", ["weights_file:3:enospc", "torch_save:7:enospc"], ids=["weights", "optimizer"]
)
def test_disk_full_while_saving_keeps_the_previous_checkpoint(
    fault, reference, tiny_bert, toy_data, tmp_path
):
    ref_out, _ = reference
    out = tmp_path / "out"
    log = tmp_path / "log"
    code = run_forked(kill_args(tiny_bert, toy_data, out), faults=[fault], log=str(log))
    text = log.read_text()
    assert code == 2, text[-3000:]
    errors = error_lines(text)
    assert len(errors) == 1 and "no space left on the device while writing" in errors[0], text[-2000:]
    assert str(out / "checkpoints") in errors[0], errors[0]
    assert "Traceback" not in text
    assert not (out / "summary.json").exists()
    kept = ckpt.checkpoint_dirs(out / "checkpoints")
    assert kept, "the previous checkpoint is gone"
    for folder in kept:
        ckpt.verify_manifest(folder)
    assert not list((out / "checkpoints").glob(".tmp-*")), "a partial checkpoint was left taking space"
    if fault.startswith("torch_save"):
        return  # the same resume as below; one is enough
    # once space is back, resume=auto finishes with the uninterrupted result
    assert run_forked(kill_args(tiny_bert, toy_data, out, resume="auto"), log=str(log)) == 0
    assert_same_tensors(adapter_tensors(out), adapter_tensors(ref_out), "resume after a full disk")


# --- non-finite losses ----------------------------------------------------------------------------------


def test_nan_batch_is_skipped_and_counted(tiny_bert, toy_data, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    code = run_forked(kill_args(tiny_bert, toy_data, out), faults=["forward:3:nan"], log=str(log))
    assert code == 0, log.read_text()[-3000:]
    assert "non-finite loss or gradient at step 3; step skipped" in log.read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nonfinite_skipped"] == 1
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out).values())


@pytest.mark.parametrize(
    ("settings", "faults", "halted_at"),
    [
        ({"train.on_nonfinite": "stop"}, ["forward:4:nan"], 4),
        ({"train.on_nonfinite": "skip", "train.max_nonfinite": 2}, ["forward:3:nan", "forward:4:nan"], 4),
    ],
    ids=["stop", "skip-then-stop-after-2-in-a-row"],
)
def test_nonfinite_stop_saves_the_last_good_state(settings, faults, halted_at, tiny_bert, toy_data, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    code = run_forked(kill_args(tiny_bert, toy_data, out, **settings), faults=faults, log=str(log))
    text = log.read_text()
    assert code == 3, text[-3000:]
    errors = error_lines(text)
    assert len(errors) == 1 and f"non-finite loss or gradient at step {halted_at}" in errors[0], text[-2000:]
    assert "Traceback" not in text and not (out / "summary.json").exists()
    newest = assert_newest_complete_checkpoint_loads(out)
    assert ckpt.read_trainer_state(newest)["global_step"] == halted_at - 1
    for weights in newest.glob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(weights)).values()), "a NaN model was saved"


# --- one run per output_dir -------------------------------------------------------------------------------


def test_second_run_into_a_live_output_dir_is_refused_and_a_dead_ones_lock_is_taken_over(
    reference, tiny_bert, toy_data, tmp_path
):
    ref_out, _ = reference
    out = tmp_path / "out"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    args = kill_args(tiny_bert, toy_data, out, resume="auto")
    first = forked_process(args, ["evaluate:1:sleep"], first_log)
    try:
        wait_for(lambda: (out / "checkpoints" / "step-1").is_dir())  # then it sleeps in its first evaluation
        for second_args in (kill_args(tiny_bert, toy_data, out), args):  # a new run, and resume=auto
            second_log.write_text("")
            assert run_forked(second_args, log=str(second_log)) == 2
            text = second_log.read_text()
            errors = error_lines(text)
            assert len(errors) == 1 and f"is in use by pid {first.pid}" in errors[0], text[-2000:]
    finally:
        first.kill()  # SIGKILL: its lock stays behind, naming a dead pid
        first.join()
    assert (out / ".lock").exists()
    assert run_forked(args, log=str(second_log)) == 0, second_log.read_text()[-3000:]
    assert_same_tensors(
        adapter_tensors(out), adapter_tensors(ref_out), "resume after taking over a stale lock"
    )


# --- SIGTERM / SIGINT outside SLURM -----------------------------------------------------------------------


@pytest.mark.parametrize("action", ["term", "int"])
def test_sigterm_or_sigint_saves_a_checkpoint_and_exits_75(action, reference, tiny_bert, toy_data, tmp_path):
    ref_out, _ = reference
    out, log = tmp_path / "out", tmp_path / "log"
    args = kill_args(tiny_bert, toy_data, out, resume="auto", **{"checkpoint.every": 4})
    code = run_forked(args, faults=[f"optimizer_step:3:{action}"], log=str(log))
    text = log.read_text()
    assert code == 75, text[-3000:]
    assert "Traceback" not in text and "resume with resume=auto" in text
    assert ckpt.read_trainer_state(assert_newest_complete_checkpoint_loads(out))["global_step"] == 3
    assert not (out / "summary.json").exists()
    assert run_forked(args, log=str(log)) == 0
    assert_same_tensors(adapter_tensors(out), adapter_tensors(ref_out), f"resume after SIG{action.upper()}")


# --- two processes ---------------------------------------------------------------------------------------


def launch_2proc(train_args: list[str], faults: list[str], log: Path) -> int:
    """`accelerate launch` (2 CPU processes) of the trainer with faults installed on each rank."""
    command = [*accelerate_launch(2, "cpu_2proc.yaml"), str(ROOT / "tests" / "fault_inject.py")]
    for fault in faults:
        command += ["--fault", fault]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("a") as handle:
        job = subprocess.run(
            [*command, "--", *train_args], cwd=ROOT, env=env, stdout=handle, stderr=handle, timeout=400
        )
    return job.returncode


@pytest.mark.slow
def test_kill_9_of_one_rank_in_a_two_process_run(tiny_bert, toy_data, tmp_path):
    reference_out, out, log = tmp_path / "reference", tmp_path / "out", tmp_path / "log"
    assert launch_2proc(kill_args(tiny_bert, toy_data, reference_out), [], log) == 0, log.read_text()[-3000:]
    args = kill_args(tiny_bert, toy_data, out, resume="auto")
    # rank 1 dies in the middle of step 4; rank 0 must not hang in the collective that follows
    assert launch_2proc(args, ["forward:4:kill@1"], log) != 0
    assert not (out / "summary.json").exists()
    newest = assert_newest_complete_checkpoint_loads(out)
    assert newest is not None and ckpt.read_trainer_state(newest)["global_step"] == 3
    assert launch_2proc(args, [], log) == 0, log.read_text()[-3000:]
    assert f"resumed from {newest}" in log.read_text()
    assert_same_tensors(
        adapter_tensors(out), adapter_tensors(reference_out), "2-process resume after kill -9"
    )


@pytest.mark.slow
def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(tiny_bert, toy_data, tmp_path):
    """Rank 1's loss turns NaN while its gradients stay finite (so the all-reduced gradient norm is finite):
    each rank deciding on its own loss would step on rank 0 only, and the ranks' weights would part."""
    out, log = tmp_path / "out", tmp_path / "log"
    args = kill_args(tiny_bert, toy_data, out, **{"checkpoint.keep_last": 10, "train.max_steps": 4})
    assert launch_2proc(args, ["forward:3:nanloss@1"], log) == 0, log.read_text()[-3000:]
    assert "non-finite loss or gradient at step 3; step skipped" in log.read_text()
    assert json.loads((out / "summary.json").read_text())["nonfinite_skipped"] == 1
    step2, step3 = (load_file(str(out / "checkpoints" / f"step-{n}" / "model.safetensors")) for n in (2, 3))
    assert_same_tensors(step2, step3, "the skipped step 3 changed the weights")
