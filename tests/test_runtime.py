"""runtime.py: the Accelerator and its process-wide state, the stop signal, device facts."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from conftest import read_summary, tiny_overrides
from scalelora.config import load_config
from scalelora.errors import ConfigError
from scalelora.runtime import (
    StopSignal,
    build_accelerator,
    deepspeed_summary,
    is_deepspeed,
    peak_memory_bytes,
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
