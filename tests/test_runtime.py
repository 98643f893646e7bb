"""runtime.py: the Accelerator and its process-wide state, the stop signal, device facts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap

import pytest
import torch
import yaml

from conftest import ROOT, accelerate_launch, read_summary, tiny_overrides
from scalelora import errors, runtime
from scalelora.checkpoint import TRAINER_STATE
from scalelora.config import load_config
from scalelora.errors import CheckpointError, ConfigError, DataError, UserError, error_class
from scalelora.runtime import (
    StopSignal,
    build_accelerator,
    check_on_each_node,
    choose_precision,
    decide_on_main,
    deepspeed_summary,
    is_deepspeed,
    peak_memory_bytes,
    pins_memory,
    resolve_precision,
    without_zero3_init,
    zero_stage,
)
from scalelora.trainer import Trainer, run_training

SPIKE_BYTES = 768 * 2**20


def test_runs_with_other_precisions_follow_each_other_in_one_process(
    tiny_bert, toy_data, tmp_path, monkeypatch
):
    """What the pipeline does: an fp32 stage, then a bf16 one, in the same Python process. Each reports
    its own peak memory: the first holds 768 MiB more for a moment, and the second, which does not,
    reports a peak that much lower (the process's peak, read as before, stayed the first's)."""
    import numpy as np

    step = Trainer.train_step

    def step_with_a_spike(self, group):
        np.ones(SPIKE_BYTES // 8).sum()  # written (resident), then freed (unmapped) at once
        return step(self, group)

    monkeypatch.setattr(Trainer, "train_step", step_with_a_spike)
    first = run_training(load_config("quickstart", tiny_overrides(tiny_bert, toy_data, tmp_path / "fp32")))
    monkeypatch.setattr(Trainer, "train_step", step)
    second = run_training(
        load_config(
            "quickstart",
            tiny_overrides(tiny_bert, toy_data, tmp_path / "bf16", **{"train.precision": "bf16"}),
        )
    )
    assert first["precision"] == "no" and second["precision"] == "bf16"
    assert read_summary(tmp_path / "bf16")["precision"] == "bf16"
    peaks = [run["peak_memory_gb"]["host"] * 2**30 for run in (first, second)]
    if os.access(runtime.CLEAR_REFS, os.W_OK):
        assert [run["peak_memory_scope"] for run in (first, second)] == [{"gpu": None, "host": "run"}] * 2
        assert peaks[0] - peaks[1] > SPIKE_BYTES * 2 / 3, [peak / 2**20 for peak in peaks]
    else:  # the host peak cannot be reset here: it is the process's, and says so
        assert second["peak_memory_scope"]["host"] == "process" and peaks[1] >= peaks[0]


def test_peak_memory_resets_per_run_and_says_where_it_cannot(tmp_path, monkeypatch):
    """Outside a run, and where /proc/self/clear_refs cannot be written, the peaks are the process's
    and say so; CUDA's are reset on every device once CUDA is initialized (before, nothing was
    allocated); without /proc the host peak is ru_maxrss."""
    memory = {"gpu": None, "host": 1}
    assert runtime.peak_memory_scope(memory) == {"gpu": None, "host": "process"}
    with runtime.run_peak_memory():
        assert runtime.peak_memory_scope(memory) == {
            "gpu": None,
            "host": "run" if os.access(runtime.CLEAR_REFS, os.W_OK) else "process",
        }
        assert runtime.peak_memory_scope({"gpu": 1, "host": 1})["gpu"] == "run"
    assert runtime.peak_memory_scope(memory)["host"] == "process"

    monkeypatch.setattr(runtime, "CLEAR_REFS", tmp_path / "no-proc" / "clear_refs")
    with runtime.run_peak_memory():
        assert runtime.peak_memory_scope(memory) == {"gpu": None, "host": "process"}

    reset: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset.append)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    runtime.reset_peak_memory()
    assert reset == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    runtime.reset_peak_memory()
    assert reset == [0, 1]

    import resource

    monkeypatch.setattr(runtime, "PROC_STATUS", tmp_path / "no-proc" / "status")
    assert runtime.host_peak_bytes() == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


AMX, AVX512_BF16 = {"amx_bf16", "amx_tile", "avx512_bf16", "avx512f"}, {"avx512_bf16", "avx512f"}
MEASURED = "benchmarks/results/a-measurement.json"


@pytest.mark.parametrize(
    ("setting", "capability", "flags", "measured", "expected", "tf32", "reason"),
    [
        # CUDA: bf16 from Ampere on, with TF32 for the fp32 matmuls left; fp32 before it
        ("auto", (8, 0), None, None, "bf16", True, "CUDA capability 8.0 >= 8.0; TF32 on for fp32 matmuls"),
        ("auto", (9, 0), None, None, "bf16", True, "CUDA capability 9.0 >= 8.0"),
        ("auto", (7, 5), None, None, "no", False, "CUDA capability 7.5 < 8.0"),
        # CPU: native bf16 alone is not enough; a committed measurement for the feature decides
        ("auto", None, AMX, {}, "no", False, "CPU with amx_bf16, where no committed measurement"),
        ("auto", None, AVX512_BF16, {}, "no", False, "CPU with avx512_bf16, where no committed"),
        ("auto", None, {"avx2", "fma"}, {}, "no", False, "CPU without native bf16"),
        ("auto", None, set(), {"amx_bf16": (True, MEASURED)}, "no", False, "CPU without native bf16"),
        (
            "auto",
            None,
            AMX,
            {"amx_bf16": (True, MEASURED)},
            "bf16",
            False,
            f"faster at equal accuracy, {MEASURED}",
        ),
        (
            "auto",
            None,
            AMX,
            {"amx_bf16": (False, MEASURED)},
            "no",
            False,
            f"no faster at equal accuracy, {MEASURED}",
        ),
        # an AMX measurement says nothing about a CPU with AVX512-BF16 alone
        ("auto", None, AVX512_BF16, {"amx_bf16": (True, MEASURED)}, "no", False, "no committed measurement"),
        # what the most capable feature measured decides for a CPU that has both
        (
            "auto",
            None,
            AMX,
            {"amx_bf16": (False, MEASURED), "avx512_bf16": (True, MEASURED)},
            "no",
            False,
            "amx_bf16",
        ),
        # an explicit setting wins on every device
        ("no", (9, 0), None, None, "no", False, None),
        ("bf16", (7, 5), None, None, "bf16", False, None),
        ("bf16", None, set(), {}, "bf16", False, None),
        ("fp16", (9, 0), None, None, "fp16", False, None),
    ],
)
def test_auto_precision_on_mocked_devices(setting, capability, flags, measured, expected, tf32, reason):
    choice = choose_precision(setting, capability=capability, flags=flags, measured=measured)
    assert (choice.precision, choice.tf32) == (expected, tf32)
    if reason is None:
        assert choice.reason is None and choice.log_line() is None
    else:
        assert reason in choice.reason
        assert choice.log_line() == f"scalelora: auto: train.precision={expected} ({choice.reason})"


def test_auto_precision_follows_a_half_precision_base_and_reads_this_machine(monkeypatch):
    assert choose_precision("auto", "bfloat16", capability=(7, 0)).precision == "bf16"
    assert choose_precision("auto", "float16", flags=AMX).precision == "fp16"
    # this process's facts: a mocked GPU, then a mocked CPU (with no committed measurement: fp32)
    monkeypatch.setattr(runtime, "cuda_capability", lambda: (8, 6))
    assert resolve_precision("auto", on_cuda=True) == runtime.PrecisionChoice(
        "bf16", True, "CUDA capability 8.6 >= 8.0; TF32 on for fp32 matmuls"
    )
    monkeypatch.setattr(runtime, "cpu_flags", lambda: set(AMX))
    monkeypatch.setattr(runtime, "CPU_BF16_MEASURED", {})  # no committed measurement: fp32
    assert resolve_precision("auto", on_cuda=False).precision == "no"
    monkeypatch.setattr(runtime, "CPU_BF16_MEASURED", {"amx_bf16": (True, MEASURED)})
    assert resolve_precision("auto", on_cuda=False).precision == "bf16"
    assert resolve_precision("no", on_cuda=False).precision == "no"
    # the committed measurement: a CPU with AVX512-BF16 (and one with AMX too, which has it) trains in bf16
    monkeypatch.undo()
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    choice = resolve_precision("auto", on_cuda=False)
    assert choice.precision == "bf16" and "cpu-minilm-precision-avx512_bf16.json" in choice.reason
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert resolve_precision("auto", on_cuda=False).precision == "no"


def test_cpu_flags_are_read_as_lscpu_shows_them():
    flags = runtime.cpu_flags()
    if not os.path.exists("/proc/cpuinfo"):
        assert flags == set()
        return
    assert flags and all(" " not in flag for flag in flags)
    assert ("avx512_bf16" in flags) == torch.cpu._is_avx512_bf16_supported()


def test_auto_precision_is_recorded_resolved_and_resume_compares_the_resolved_value(
    tiny_bert, toy_data, tmp_path, monkeypatch, capsys
):
    """On a host where `auto` means bf16 (mocked: a CPU with AMX measured faster in bf16), the run trains
    in bf16 and records bf16; the same config on a host where it means fp32 cannot resume its checkpoint."""
    monkeypatch.setattr(runtime, "cpu_flags", lambda: set(AMX))
    monkeypatch.setattr(runtime, "CPU_BF16_MEASURED", {"amx_bf16": (True, MEASURED)})
    out = tmp_path / "run"
    args = tiny_overrides(tiny_bert, toy_data, out, **{"train.precision": "auto", "checkpoint.every": 3})
    summary = run_training(load_config("quickstart", args))
    assert "scalelora: auto: train.precision=bf16 (CPU with amx_bf16: bf16 measured faster" in (
        capsys.readouterr().err
    )
    assert summary["precision"] == read_summary(out)["precision"] == "bf16"
    # config.yaml is the config as the run used it (as for the data-driven default's choices)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["precision"] == "bf16"
    state = json.loads((out / "checkpoints" / "step-3" / TRAINER_STATE).read_text())
    assert state["identity"]["train.precision"] == "bf16"

    monkeypatch.setattr(runtime, "CPU_BF16_MEASURED", {})  # another host: `auto` is fp32 there
    resume = [*args, f"resume={out / 'checkpoints' / 'step-3'}"]
    with pytest.raises(CheckpointError, match="train.precision: checkpoint 'bf16', now 'no'"):
        run_training(load_config("quickstart", resume))


@pytest.mark.gpu
def test_auto_precision_on_this_gpu_and_tf32_only_for_it(tiny_bert, toy_data, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    modern = torch.cuda.get_device_capability() >= (8, 0)
    args = tiny_overrides(tiny_bert, toy_data, tmp_path, **{"train.precision": "auto"})
    cfg = load_config("quickstart", args)
    accelerator = build_accelerator(cfg)
    assert cfg.train.precision == accelerator.mixed_precision == ("bf16" if modern else "no")
    assert torch.get_float32_matmul_precision() == ("high" if modern else "highest")
    assert accelerator.non_blocking  # pinned batches are copied without blocking
    accelerator.end_training()
    runtime.reset_accelerate_state()
    build_accelerator(load_config("quickstart", tiny_overrides(tiny_bert, toy_data, tmp_path)))
    assert torch.get_float32_matmul_precision() == "highest"  # an explicit precision: no TF32


def test_loaders_pin_memory_for_cuda_only(tiny_bert, toy_data, tmp_path, monkeypatch):
    """Pinning cannot be observed without CUDA: the decision is checked, and that the trainer's loaders
    (after Accelerate's prepare) carry it."""
    assert pins_memory(torch.device("cuda")) and pins_memory(torch.device("cuda", 1))
    assert not pins_memory(torch.device("cpu"))
    cfg = load_config("quickstart", tiny_overrides(tiny_bert, toy_data, tmp_path / "cpu"))
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        assert not trainer.accelerator.non_blocking
        assert not trainer.train_loader.pin_memory
        assert not any(loader.pin_memory for loader in trainer.eval_loaders.values())
    finally:
        trainer.close()
    runtime.reset_accelerate_state()
    import scalelora.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "pins_memory", lambda device: True)  # as on a GPU
    trainer = Trainer(load_config("quickstart", tiny_overrides(tiny_bert, toy_data, tmp_path / "gpu")))
    try:
        trainer.setup()
        assert trainer.train_loader.pin_memory
        assert trainer.eval_loaders and all(loader.pin_memory for loader in trainer.eval_loaders.values())
    finally:
        trainer.close()


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
