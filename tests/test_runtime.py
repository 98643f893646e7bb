"""runtime.py: the Accelerator and its process-wide state, the stop signal, device facts."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap

import pytest
import torch

from conftest import ROOT, accelerate_launch, read_summary, tiny_overrides
from scalelora import errors
from scalelora.config import load_config
from scalelora.errors import CheckpointError, ConfigError, DataError, UserError, error_class
from scalelora.runtime import (
    StopSignal,
    build_accelerator,
    check_on_each_node,
    decide_on_main,
    deepspeed_summary,
    is_deepspeed,
    peak_memory_bytes,
    without_zero3_init,
    zero_stage,
)
from scalelora.trainer import run_training


def test_runs_with_other_precisions_follow_each_other_in_one_process(tiny_bert, toy_data, tmp_path):
    """What the pipeline does: an fp32 stage, then a bf16 one, in the same Python process."""
    first = run_training(load_config("quickstart", tiny_overrides(tiny_bert, toy_data, tmp_path / "fp32")))
    second = run_training(
        load_config(
            "quickstart",
            tiny_overrides(tiny_bert, toy_data, tmp_path / "bf16", **{"train.precision": "bf16"}),
        )
    )
    assert first["precision"] == "no" and second["precision"] == "bf16"
    assert read_summary(tmp_path / "bf16")["precision"] == "bf16"


def test_fp16_is_refused_without_a_gpu(tiny_bert, toy_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 runs where CUDA is present")
    cfg = load_config(
        "quickstart", tiny_overrides(tiny_bert, toy_data, tmp_path, **{"train.precision": "fp16"})
    )
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        build_accelerator(cfg)


def test_a_plain_run_is_not_deepspeed_and_reports_its_memory(tiny_bert, toy_data, tmp_path):
    accelerator = build_accelerator(load_config("quickstart", tiny_overrides(tiny_bert, toy_data, tmp_path)))
    assert not is_deepspeed(accelerator) and zero_stage(accelerator) is None
    assert deepspeed_summary(accelerator) is None
    memory = peak_memory_bytes(accelerator.device)
    assert memory["host"] > 50 * 2**20  # at least what torch itself takes
    assert memory["gpu"] is None if accelerator.device.type == "cpu" else memory["gpu"] >= 0


def test_a_stop_signal_is_recorded_not_raised_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopSignal()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)

        class One:
            num_processes = 1

        assert stop.requested(One()) and stop.signal_name == "SIGUSR1"
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


class OneProcess:
    is_main_process = True
    is_local_main_process = True
    num_processes = 1


def fail(error: Exception) -> None:
    raise error


def test_a_decision_on_main_returns_its_value_and_raises_its_user_error_as_it_is():
    assert decide_on_main(OneProcess(), lambda: "step-4") == "step-4"
    assert decide_on_main(OneProcess(), lambda: "kept", share_value=False) == "kept"  # on the main process
    with pytest.raises(DataError, match="^the cache was built for other data$"):
        decide_on_main(OneProcess(), lambda: fail(DataError("the cache was built for other data")))
    with pytest.raises(CheckpointError, match="^damaged$"):
        check_on_each_node(OneProcess(), lambda: fail(CheckpointError("damaged")))
    checked = []
    check_on_each_node(OneProcess(), lambda: checked.append(1), skip_main=True)
    assert not checked, "skip_main: the main process has checked already"


def test_a_bug_in_a_decision_is_not_turned_into_a_user_error():
    bug = KeyError("not a user's mistake")
    for helper in (decide_on_main, check_on_each_node):
        with pytest.raises(KeyError) as caught:
            helper(OneProcess(), lambda: fail(bug))
        assert caught.value is bug, helper.__name__


def test_every_user_error_class_crosses_processes_by_name():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, UserError)]
    assert len(classes) >= 8
    for cls in classes:
        assert error_class(cls.__name__) is cls
    assert error_class("NameFromANewerVersion") is UserError


TWO_RANKS = """
    import sys
    from pathlib import Path

    from accelerate import PartialState

    from scalelora.errors import CheckpointError, DataError, UserError
    from scalelora.runtime import check_on_each_node, decide_on_main

    state = PartialState(cpu=True, backend="gloo")
    rank = state.process_index
    seen = Path(sys.argv[1]) / f"rank{rank}.txt"  # one file per rank: lines on a shared stdout interleave


    class OwnNode:  # each rank its node's local main process, as on two one-GPU nodes
        is_local_main_process = True
        is_main_process = state.is_main_process
        num_processes = state.num_processes


    def report(what, call):
        try:
            line = f"{what}: {call()!r}"
        except UserError as err:
            line = f"{what}: {type(err).__name__}: {err}"
        with seen.open("a") as handle:
            handle.write(line + "\\n")


    def refuse():
        raise DataError(f"refused on rank {rank}")


    def damaged():
        raise CheckpointError(f"bad on rank {rank}")


    report("value", lambda: decide_on_main(state, lambda: f"decided on rank {rank}"))
    report("kept", lambda: decide_on_main(state, lambda: f"kept on rank {rank}", share_value=False))
    report("error", lambda: decide_on_main(state, refuse))
    report("node", lambda: check_on_each_node(OwnNode(), damaged))
    report("skip", lambda: check_on_each_node(OwnNode(), damaged, skip_main=True))
    report("bug", lambda: decide_on_main(state, lambda: {}["a bug on rank 0"]))
"""


@pytest.mark.slow
def test_two_processes_share_the_main_decision_and_the_first_error(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(textwrap.dedent(TWO_RANKS))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*accelerate_launch(2, "cpu_2proc.yaml"), str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    seen = {rank: (tmp_path / f"rank{rank}.txt").read_text().splitlines() for rank in (0, 1)}
    for rank in (0, 1):
        assert seen[rank][:5] == [
            "value: 'decided on rank 0'",
            f"kept: {'None' if rank else repr('kept on rank 0')}",
            "error: DataError: refused on rank 0",
            "node: CheckpointError: bad on rank 0",  # the first error, in rank order
            "skip: CheckpointError: bad on rank 1",
        ], result.stderr[-3000:]
    # a bug on the main process ends the launch with its traceback; no rank goes on as if decided
    assert result.returncode != 0
    assert "KeyError: 'a bug on rank 0'" in result.stderr, result.stderr[-3000:]
    assert len(seen[0]) == len(seen[1]) == 5


def test_without_zero3_init_switches_transformers_zero3_flag_off_for_the_block_only():
    """transformers builds every model under deepspeed.zero.Init while its ZeRO-3 flag is on; a teacher
    loaded inside the block is built whole (the 2-process run: test_deepspeed.py)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    with without_zero3_init():  # no DeepSpeed config at all: nothing to do
        assert not is_deepspeed_zero3_enabled()
    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        with without_zero3_init():
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()
        with pytest.raises(RuntimeError), without_zero3_init():
            raise RuntimeError("restored on the way out of an error too")
        assert is_deepspeed_zero3_enabled()
    finally:
        del config
        unset_hf_deepspeed_config()
