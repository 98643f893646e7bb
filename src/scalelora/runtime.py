"""The Accelerator (precision, `train.precision=auto` resolved for the device, accumulation, gloo on CPU,
pinned-memory transfers on CUDA, DeepSpeed from the launch config), seeding,
the stop signal (preemption, SIGTERM, Ctrl-C) that every rank agrees on in the same step, and the
decisions one process makes for all (`decide_on_main`, `check_on_each_node`), whose errors every rank
raises."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DeepSpeedPlugin,
    DistributedType,
    DynamoBackend,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    TorchDynamoPlugin,
    set_seed,
)

from scalelora.config import RunConfig
from scalelora.errors import ConfigError, UserError, error_class

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; slurm/preemptible.sbatch requeues on it
STOP_SIGNALS = ("SIGUSR1", "SIGTERM", "SIGINT")
T = TypeVar("T")


# --- train.precision=auto ----------------------------------------------------------------------------

# bf16 autocast on CUDA from this compute capability (Ampere): bf16 tensor cores, and TF32 for any fp32
# matmul left outside autocast
CUDA_BF16_CAPABILITY = (8, 0)
# CPU features that run bf16 matmuls natively, most capable first (names as /proc/cpuinfo and lscpu write them)
CPU_BF16_FEATURES = ("amx_bf16", "avx512_bf16")
# What the project's own measurement (`python -m scalelora.bench --precision-pairs`, benchmarks/README.md)
# found on a CPU whose most capable bf16 feature is the key: (bf16 is the faster at equal accuracy, the
# committed JSON that shows it). A feature without an entry has not been measured, and `auto` keeps fp32
# there: on one AMX machine the whole quickstart ran only 1.17x faster in bf16 against 2.6-9x for a bare
# matmul, on a noisy host, so a matmul benchmark does not decide it.
CPU_BF16_MEASURED: dict[str, tuple[bool, str]] = {
    # 2-core AMD EPYC, 2026-12-06: whole quickstarts, 2 alternating repeats, bf16 1.49x the fp32 steady
    # samples/s, test accuracy equal (0.8311), validation 0.8246 against 0.8236
    "avx512_bf16": (True, "benchmarks/results/cpu-minilm-precision-avx512_bf16.json"),
}
# what the bench calls "faster at equal accuracy": the paired median speed-up of steady-state samples/s,
# and the largest drop in quickstart test accuracy (0.5 points: 5 of rotten_tomatoes' 1,066 test texts)
CPU_BF16_MIN_SPEEDUP = 1.10
CPU_BF16_MAX_ACCURACY_DROP = 0.005


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    """`no`, `fp16` or `bf16`: what Accelerate runs."""
    tf32: bool = False
    """Let CUDA run the remaining fp32 matmuls in TF32."""
    reason: str | None = None
    """Why `auto` chose it (None: set explicitly)."""

    def log_line(self) -> str | None:
        if self.reason is None:
            return None
        return f"scalelora: auto: train.precision={self.precision} ({self.reason})"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo, as lscpu shows them); empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cuda_capability() -> tuple[int, int] | None:
    """Compute capability of this process's GPU (LOCAL_RANK's under a launcher); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def choose_precision(
    setting: str,
    model_dtype: str = "float32",
    capability: tuple[int, int] | None = None,
    flags: set[str] | None = None,
    measured: dict[str, tuple[bool, str]] | None = None,
) -> PrecisionChoice:
    """`train.precision` resolved: an explicit `no|fp16|bf16` as it is; `auto` for a GPU of compute
    `capability` (None: the CPU, with feature `flags`) by the rules above and the CPU measurements
    `measured` (default CPU_BF16_MEASURED). A half-precision `model.dtype` decides `auto` by itself."""
    if setting != "auto":
        return PrecisionChoice(setting)
    if model_dtype != "float32":
        wanted = "bf16" if model_dtype == "bfloat16" else "fp16"
        return PrecisionChoice(wanted, reason=f"model.dtype={model_dtype} needs it")
    if capability is not None:
        shown = f"CUDA capability {capability[0]}.{capability[1]}"
        floor = f"{CUDA_BF16_CAPABILITY[0]}.{CUDA_BF16_CAPABILITY[1]}"
        if tuple(capability) >= CUDA_BF16_CAPABILITY:
            return PrecisionChoice("bf16", tf32=True, reason=f"{shown} >= {floor}; TF32 on for fp32 matmuls")
        return PrecisionChoice("no", reason=f"{shown} < {floor}: no bf16 tensor cores")
    measured = CPU_BF16_MEASURED if measured is None else measured
    native = [feature for feature in CPU_BF16_FEATURES if feature in (flags or set())]
    if not native:
        return PrecisionChoice("no", reason=f"CPU without native bf16 ({' or '.join(CPU_BF16_FEATURES)})")
    for feature in native:
        if feature in measured:
            pays, source = measured[feature]
            if pays:
                return PrecisionChoice(
                    "bf16", reason=f"CPU with {feature}: bf16 measured faster at equal accuracy, {source}"
                )
            return PrecisionChoice(
                "no", reason=f"CPU with {feature}: bf16 measured no faster at equal accuracy, {source}"
            )
    return PrecisionChoice(
        "no",
        reason=f"CPU with {native[0]}, where no committed measurement shows bf16 faster at equal accuracy",
    )


def resolve_precision(
    setting: str, model_dtype: str = "float32", on_cuda: bool | None = None
) -> PrecisionChoice:
    """`choose_precision` for this process's device (CUDA when available, unless `on_cuda` says)."""
    if setting != "auto":
        return PrecisionChoice(setting)
    on_cuda = torch.cuda.is_available() if on_cuda is None else on_cuda
    if on_cuda:
        return choose_precision(setting, model_dtype, capability=cuda_capability())
    return choose_precision(setting, model_dtype, flags=cpu_flags())


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast of a resolved precision on `device` (a no-op for `no`): for models Accelerate does not
    wrap, such as a separate frozen teacher, so they run in the training run's precision."""
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def pins_memory(device: torch.device) -> bool:
    """Whether data loaders for `device` pin their batches: only for CUDA, where a pinned host batch is
    copied asynchronously (Accelerate's `non_blocking` transfers); the CPU has nothing to copy to."""
    return device.type == "cuda"


def quantized_device_map(model: Any, device: torch.device) -> Any:
    """Where bitsandbytes loads a quantized base (`model.load_in_8bit`/`load_in_4bit`): this process's
    GPU, or the CPU; None for an unquantized base (the Accelerator places it)."""
    if not (model.load_in_8bit or model.load_in_4bit):
        return None
    return {"": device.index or 0} if device.type == "cuda" else "cpu"


def build_accelerator(cfg: RunConfig, log_with: list[str] | None = None) -> Accelerator:
    """One Accelerator for the run. `train.precision=auto` is resolved for this device first and
    written back into `cfg` (so config.yaml, summary.json and the resume identity record what ran),
    the choice logged with its reason. Raises ConfigError for a precision the device cannot run."""
    choice = resolve_precision(cfg.train.precision, cfg.model.dtype)
    cfg.train.precision = choice.precision
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a GPU; use train.precision=no (or bf16) on CPU")
    no_cuda = not torch.cuda.is_available()
    if not no_cuda:
        # every run sets it, so a run in the same process as an `auto` one does not inherit its TF32.
        # torch's global setting, not the per-backend `fp32_precision`: mixing the two makes
        # torch.get_float32_matmul_precision(), which torch.compile's inductor calls, raise
        torch.set_float32_matmul_precision("high" if choice.tf32 else "highest")
    deepspeed_launch = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    dynamo = dynamo_plugin(cfg.train.compile, torch.device("cpu" if no_cuda else "cuda"))
    kwargs_handlers = []
    if no_cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Without an explicit gloo backend Accelerate silently runs DeepSpeed launches as one process on CPU.
        kwargs_handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        # torchrun-launched CPU processes are MULTI_CPU only when Accelerate is told it is on CPU;
        # not under DeepSpeed, which `cpu=True` would silently switch off
        cpu=no_cuda and not deepspeed_launch,
        mixed_precision=cfg.train.precision,
        # Counter-based sync: the trainer feeds exactly grad_accum micro-batches per optimizer step,
        # across epoch boundaries, so syncing never depends on where a dataloader ends.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.grad_accum, sync_with_dataloader=False
        ),
        # batches pinned by the loaders (pin_memory) are copied to the GPU without blocking the host
        dataloader_config=DataLoaderConfiguration(non_blocking=not no_cuda),
        step_scheduler_with_optimizer=False,
        log_with=log_with,
        project_dir=str(cfg.run_dir),
        kwargs_handlers=kwargs_handlers,
        dynamo_plugin=dynamo,
        # the DeepSpeed JSON says "auto" for clipping; fill it from the recipe (0 = no clipping in DeepSpeed)
        deepspeed_plugin=DeepSpeedPlugin(gradient_clipping=cfg.train.max_grad_norm or 0.0)
        if deepspeed_launch
        else None,
    )
    if is_deepspeed(accelerator):
        check_deepspeed_config(cfg, accelerator.state.deepspeed_plugin.deepspeed_config)
    line = choice.log_line()
    if line and accelerator.is_main_process:
        print(line, file=sys.stderr, flush=True)
    launched = launch_dynamo_backend()
    if launched and dynamo.backend == DynamoBackend.NO and accelerator.is_main_process:
        print(
            f"scalelora: warning: the launch config's dynamo_backend={launched} is not used: train.compile="
            f"{str(cfg.train.compile).lower()} does not compile here (train.compile=true compiles with it)",
            file=sys.stderr,
            flush=True,
        )
    set_seed(cfg.seed)
    return accelerator


def check_deepspeed_config(cfg: RunConfig, ds_config: dict[str, Any]) -> None:
    """Refuse what cannot work under this DeepSpeed config (the stage is only known from the launch).

    Raises ConfigError listing every problem, each with what to use instead.
    """
    problems = []
    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    for block in ("optimizer", "scheduler"):
        if block in ds_config:
            problems.append(
                f"the DeepSpeed config defines an '{block}' block: remove it; train.lr, train.weight_decay and "
                "train.scheduler drive both (ZeRO offload switches AdamW to DeepSpeedCPUAdam by itself)"
            )
    if cfg.model.load_in_8bit and stage == 3:
        problems.append(
            "model.load_in_8bit cannot be sharded by ZeRO-3: use model.load_in_4bit=true (its quant storage "
            "matches model.dtype) or accel_configs/deepspeed_zero2.yaml"
        )
    if (cfg.model.load_in_8bit or cfg.model.load_in_4bit) and (
        zero.get("offload_param", {}).get("device", "none") != "none"
    ):
        problems.append(
            "an 8/4-bit base cannot be offloaded to CPU by ZeRO: use accel_configs/deepspeed_zero3.yaml "
            "(no offload) or load_in_8bit/load_in_4bit=false"
        )
    if problems:
        raise ConfigError("; ".join(problems))


def is_deepspeed(accelerator: Accelerator) -> bool:
    """The one test for "does this run go through DeepSpeed" (the launch config decides it)."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int | None:
    """The ZeRO stage of a DeepSpeed run; None when the run does not use DeepSpeed."""
    if not is_deepspeed(accelerator):
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def deepspeed_summary(accelerator: Accelerator) -> dict[str, Any] | None:
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


def unwrap_model(model: torch.nn.Module, keep_compiled: bool = False) -> torch.nn.Module:
    """The model inside the wrappers `prepare` adds (DDP, DataParallel, DeepSpeed's engine, torch.compile's
    OptimizedModule). With `keep_compiled`, a compiled wrapper around the model itself is kept (one
    process: a forward that runs compiled, with no wrapper's synchronisation); one around DDP, where
    Accelerate puts it, is not, as it cannot run the model without DDP.

    Accelerate's `unwrap_model` does the same but imports DeepSpeed (when installed) to test
    `isinstance(model, DeepSpeedEngine)`, which costs a plain CPU run 0.3 s and prints "Setting
    accelerator to CPU"; the engine is recognised here by its class name instead. Unlike Accelerate's
    default, the compiled wrapper is removed, so parameter names and state-dict keys carry no
    `_orig_mod.` prefix (a saved adapter stays loadable).
    """
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if (
            isinstance(model, (DistributedDataParallel, DataParallel))
            or type(model).__name__ == "DeepSpeedEngine"
        ):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), torch.nn.Module):
            if keep_compiled and unwrap_model(inner) is inner:
                return model
            model = inner
        else:
            return model


COMPILED_PREFIX = "_orig_mod."


def without_compiled_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """`state` under the model's own names: torch.compile's wrapper prefixes its module's with
    `_orig_mod.`, which a model loaded without it does not know (its load then matches nothing)."""
    return {key.replace(COMPILED_PREFIX, ""): value for key, value in state.items()}


def model_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """Collective under ZeRO-3 (every rank must call it): the full state dict of the unwrapped model,
    under its own names (no `_orig_mod.`: Accelerate's unwrap keeps a compiled wrapper); under ZeRO-3
    None on every rank but the main one, where the shards are gathered."""
    if is_deepspeed(accelerator):
        state = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards
        return None if state is None else without_compiled_prefix(state)
    return unwrap_model(model).state_dict()


def process_seconds() -> float | None:
    """Seconds since this process started (Linux: /proc; None elsewhere): interpreter start-up and imports
    included, which a timer started inside the program cannot see."""
    try:
        from pathlib import Path

        # field 22 of stat (the start time in clock ticks since boot); the name before ")" may hold spaces
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def compile_enabled(setting: bool | str, device: torch.device) -> bool:
    """`train.compile` resolved for `device`: `auto` compiles on CUDA only. On CPU a compiled MiniLM LoRA
    step ran at 0.89x eager after 65 s of compiling (docs/performance.md), so it does not pay there."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


DEFAULT_COMPILE_BACKEND = "inductor"


def launch_dynamo_backend() -> str | None:
    """The dynamo backend `accelerate launch` was given (`--dynamo_backend`, or `dynamo_config` in its
    config file), lower case; None when it names none (`no`) or the run was not launched by it."""
    value = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    return None if value == "no" else value


def dynamo_plugin(setting: bool | str, device: torch.device) -> TorchDynamoPlugin:
    """How `prepare` compiles the model: `train.compile` resolved for `device` decides whether (a launch
    config's dynamo backend alone never compiles), and the launch's backend, or inductor, with what.

    Accelerate compiles after wrapping: the DDP wrapper inside the compiled one, and under DeepSpeed
    the engine's module in place (`engine.compile`). The modules `save_state` and `load_state` see are
    never torch.compile's wrapper, so checkpoint and adapter names never carry its `_orig_mod.` prefix,
    and a resume may switch train.compile either way.
    """
    if not compile_enabled(setting, device):
        return TorchDynamoPlugin(backend="no")
    return TorchDynamoPlugin(backend=launch_dynamo_backend() or DEFAULT_COMPILE_BACKEND)


def compiles(accelerator: Accelerator) -> bool:
    """Whether `prepare` compiles the model (`dynamo_plugin`)."""
    return accelerator.state.dynamo_plugin.backend != DynamoBackend.NO


# Linux: writing "5" here resets the process's peak resident size (VmHWM in /proc/self/status) to its
# current size (proc(5)); ru_maxrss is never reset
CLEAR_REFS = Path("/proc/self/clear_refs")
PROC_STATUS = Path("/proc/self/status")
# what the peaks read now cover (see `run_peak_memory`): None outside a run, whose peaks are the process's
_peak_scope: dict[str, str] | None = None


def host_peak_bytes() -> int:
    """This process's peak resident size: VmHWM (which `reset_peak_memory` can reset), or `ru_maxrss`
    where /proc cannot be read."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def reset_peak_memory() -> dict[str, str]:
    """Reset this process's peak memory readings to what it holds now; returns what each peak read from
    now on covers: `run` (from now) or `process` (from the process start: the reset is not possible here).

    CUDA: the caching allocator's peaks of every device, once CUDA is initialized (before that nothing
    was allocated). Host: the peak resident size through /proc/self/clear_refs (Linux; not writable in
    some containers, where the host peak stays the process's).
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
    try:
        CLEAR_REFS.write_text("5")
        host = "run"
    except OSError:
        host = "process"
    return {"gpu": "run", "host": host}


@contextlib.contextmanager
def run_peak_memory() -> Iterator[dict[str, str]]:
    """Inside the block, `peak_memory_bytes` reads the peaks since the block began, where that can be
    reset (`reset_peak_memory`, and `peak_memory_scope` says where): one run's own peak when several
    runs share a process (a study trains every row in one)."""
    global _peak_scope
    _peak_scope = reset_peak_memory()
    try:
        yield _peak_scope
    finally:
        _peak_scope = None


def accelerator_facts(accelerator: Accelerator) -> dict[str, Any]:
    """Where a run ran and what it held, for its summary: processes, the distributed type, DeepSpeed's
    settings, and the peak memory in GiB (`peak_memory_bytes` of the run's device)."""
    memory = peak_memory_bytes(accelerator.device)
    return {
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "deepspeed": deepspeed_summary(accelerator),
        "peak_memory_gb": {k: (v / 2**30 if v is not None else None) for k, v in memory.items()},
    }


def peak_memory_bytes(device: torch.device | str | None = None) -> dict[str, int | None]:
    """Peak accelerator memory allocated by this process (None off CUDA) and its peak resident host
    memory: since `run_peak_memory` began, where it could reset them (see `peak_memory_scope`)."""
    device = torch.device(device) if device is not None else None
    on_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
    gpu = int(torch.cuda.max_memory_allocated(device)) if on_cuda else None
    return {"gpu": gpu, "host": host_peak_bytes()}


def peak_memory_scope(memory: dict[str, Any]) -> dict[str, str | None]:
    """What each peak of `memory` (a `peak_memory_bytes` reading) covers: `run` (since this run's
    `run_peak_memory` began), `process` (since the process started), None where there is no reading."""
    return {
        key: None if value is None else (_peak_scope or {}).get(key, "process")
        for key, value in memory.items()
    }


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons (and transformers' ZeRO-3 flag), so another run in this
    process can choose its own precision, accumulation and DeepSpeed settings. Call after `end_training`."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    unset_hf_deepspeed_config()


@contextlib.contextmanager
def without_zero3_init() -> Iterator[None]:
    """Inside the block transformers builds models whole on every rank, not partitioned by
    `deepspeed.zero.Init`: for a model never handed to DeepSpeed (a frozen teacher), whose partitioned
    weights nothing would gather. Under ZeRO-3 transformers reads its flag from a weak reference to the
    HfDeepSpeedConfig Accelerate keeps alive; it is cleared for the block and restored after it.
    (Accelerate's `zero3_init_context_manager(enable=False)` re-creates that config with the same
    ZeRO stage, so transformers still builds under zero.Init.)"""
    from transformers.integrations import deepspeed as hf_deepspeed

    held = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = held() if held is not None else None  # kept alive through the block
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


class StopSignal:
    """Turns SIGUSR1/SIGTERM/SIGINT into a flag the trainer checks once per optimizer step.

    `requested(accelerator)` all-reduces the flag so every rank stops at the same step and none
    is left waiting in a collective. A second Ctrl-C interrupts at once.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for name in STOP_SIGNALS:
            number = getattr(signal, name)
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                return

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: Any) -> None:
        if self.signal_name is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(number).name

    def requested(self, accelerator: Accelerator) -> bool:
        local = self.signal_name is not None
        if accelerator.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def decide_on_main(accelerator: Any, decide: Callable[[], T], share_value: bool = True) -> T | None:
    """Collective: the main process runs `decide`; every rank returns its value or raises its error.

    A UserError raised by `decide` is raised on every rank, of the same class and with the same message,
    so no rank is left waiting in a collective for one that gave up. Anything else (a bug) propagates
    on the main process alone, with its traceback, and the launcher ends the others. With `share_value`
    false the value stays on the main process and the others get None (for values too large to send).
    `accelerator`: an Accelerator or a PartialState.
    """
    outcome: list[Any] = [None]
    raised: UserError | None = None
    value: T | None = None
    if accelerator.is_main_process:
        try:
            value = decide()
        except UserError as err:
            raised = err
            outcome[0] = ("error", type(err).__name__, str(err))
        else:
            outcome[0] = ("value", value if share_value else None)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome, from_process=0)
    if raised is not None:
        raise raised  # the original, traceback and all
    if outcome[0][0] == "error":
        raise error_class(outcome[0][1])(outcome[0][2])
    return value if accelerator.is_main_process else outcome[0][1]


def check_on_each_node(accelerator: Any, check: Callable[[], None], skip_main: bool = False) -> None:
    """Collective: one process per node (its local main) runs `check`, on the files as that node sees
    them; every rank raises the first UserError any of them raised (in rank order), of the same class
    and with the same message. `skip_main`: the main process has checked already. Anything else (a bug)
    propagates on its own rank, as in `decide_on_main`.
    """
    error: tuple[str, str] | None = None
    if accelerator.is_local_main_process and not (skip_main and accelerator.is_main_process):
        try:
            check()
        except UserError as err:
            error = (type(err).__name__, str(err))
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        error = next((found for found in gather_object([error]) if found), None)
    if error is not None:
        raise error_class(error[0])(error[1])


@contextlib.contextmanager
def hidden_package(name: str, hide: bool = True, forget: Callable[[], None] | None = None) -> Iterator[None]:
    """Inside the block `import <name>` raises ImportError (with `hide`, unless the package is already
    imported): libraries that import an optional package only to offer or test for it skip it. `forget`
    clears the libraries' cached "is it installed?" answers, on the way in (a cached yes would import it
    anyway, and fail) and on the way out (a later use in the same process finds it again)."""
    if not hide or sys.modules.get(name) is not None:
        yield  # asked for, or already imported: nothing to save
        return
    sys.modules[name] = None  # type: ignore[assignment]  # makes `import <name>` raise ImportError
    if forget is not None:
        forget()
    try:
        yield
    finally:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]
        if forget is not None:
            forget()


def deepspeed_hidden(hide: bool = True) -> contextlib.AbstractContextManager[None]:
    """`hidden_package("deepspeed")`: Accelerate's `is_deepspeed_available()` (not cached) then says no.
    transformers' `save_pretrained` unwraps the model through Accelerate's `extract_model_from_parallel`,
    which imports DeepSpeed whenever it is installed only to test `isinstance` against its engine: a run
    without DeepSpeed would pay its import and print "Setting accelerator to CPU"."""
    return hidden_package("deepspeed", hide)
