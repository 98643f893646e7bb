"""Test-only fault injection around the real trainer, with no hook in production code.

A fault is `POINT:N[:ACTION][@RANK]`: at the N-th call of the function behind POINT, do ACTION
(`kill`: SIGKILL this process, as `kill -9` would; `term`/`int`: send it SIGTERM/SIGINT and
carry on; `sleep`: hang for 2 minutes; `enospc`: raise "No space left on device"; `nan`: make
that forward's loss NaN, and its gradients with it; `nanloss`: make the loss value NaN while its
gradients stay finite, as a NaN in a term that does not depend on the weights would), on every
rank or only on RANK. The patches are installed in the process that runs the trainer, which is
either a child forked by `run_forked` (fast: it reuses the test process's imports) or a process that
`accelerate launch tests/fault_inject.py --fault SPEC -- TRAIN_ARGS` starts on each rank.

`--count FILE` (or `count_file=`) records how often each point was reached, so a test can draw
seeded kill points from the calls a real run makes.

`--forbid-unsafe-load` makes every `torch.load` that could run code (`weights_only=False`, or a
custom pickle module) raise instead, wherever it is called from (DeepSpeed, Accelerate), and prints
`fault_inject: torch.load calls: N safe, M refused` at the end, so a test sees that loads happened.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

# point -> (module, attribute path, when): "before" acts on entry, "after" once the call returned. A
# function imported by name is patched where it is looked up: "a+b" patches it in modules a and b alike.
POINTS: dict[str, tuple[str, str, str]] = {
    "forward": ("scalelora.trainer", "Trainer.compute_loss", "after"),  # mid optimizer step
    "optimizer_step": ("torch.optim.AdamW", "step", "before"),
    "evaluate": ("scalelora.evaluator", "evaluate_split", "before"),
    "metrics": ("scalelora.checkpoint", "Checkpointer.append_metrics", "before"),
    "save_state": ("accelerate.Accelerator", "save_state", "before"),
    "weights_file": ("accelerate.utils.other", "safe_save_file", "after"),  # some checkpoint files on disk
    "torch_save": ("torch", "save", "after"),  # optimizer/scheduler/RNG state of a checkpoint
    "json_write": ("scalelora.checkpoint", "atomic_write_json", "before"),
    "manifest": ("scalelora.checkpoint", "write_manifest", "before"),
    # just after an os.replace: in files.py's atomic writes and folder swaps, and in save_checkpoint
    "renamed": ("scalelora.files+scalelora.checkpoint", "fsync_dir", "before"),
    "prune": ("shutil", "rmtree", "before"),
    "adapter_swap": ("scalelora.checkpoint", "replace_dir", "before"),
}


def parse_fault(spec: str) -> tuple[str, int, str, int | None]:
    spec, _, rank = spec.partition("@")
    point, n, *action = spec.split(":")
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point}")
    return point, int(n), (action[0] if action else "kill"), (int(rank) if rank else None)


def resolve(module_name: str, attr_path: str) -> tuple[Any, str]:
    import importlib

    owner: Any
    if module_name == "torch.optim.AdamW":
        import torch

        owner = torch.optim.AdamW
        return owner, attr_path
    if module_name == "accelerate.Accelerator":
        import accelerate

        return accelerate.Accelerator, attr_path
    owner = importlib.import_module(module_name)
    *parents, name = attr_path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name


def act(action: str, point: str) -> None:
    if action == "kill":
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    elif action in ("term", "int"):
        os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGINT)
    elif action == "sleep":
        import time

        time.sleep(120)  # hold the run (and its lock) until the test kills it
    elif action not in ("nan", "nanloss"):
        raise ValueError(f"unknown fault action {action}")


def install(faults: list[str], count_all: bool = False) -> Counter[str]:
    """Patch every point that a fault (or, with count_all, the counter) needs; return the live call counts."""
    rank = int(os.environ.get("RANK", "0"))
    wanted = [parse_fault(f) for f in faults]
    wanted = [(p, n, a) for p, n, a, r in wanted if r is None or r == rank]
    counts: Counter[str] = Counter()
    points = set(POINTS) if count_all else {p for p, _, _ in wanted}
    for point in points:
        module_names, attr_path, when = POINTS[point]
        owners = [resolve(module_name, attr_path) for module_name in module_names.split("+")]
        original = getattr(*owners[0])
        assert all(getattr(owner, name) is original for owner, name in owners), f"{point}: not one function"
        mine = [(n, a) for p, n, a in wanted if p == point]

        def make(original: Callable, point: str, when: str, mine: list[tuple[int, str]]) -> Callable:
            @functools.wraps(original)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                counts[point] += 1
                due = [a for n, a in mine if n == counts[point]]
                if "enospc" in due:  # a full disk fails the write itself
                    target = args[1] if len(args) > 1 and isinstance(args[1], (str, os.PathLike)) else None
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target) if target else None)
                if when == "before":
                    for action in due:
                        act(action, point)
                result = original(*args, **kwargs)
                if when == "after":
                    for action in due:
                        if action == "nan":
                            loss, parts = result
                            result = (loss * float("nan"), {k: v * float("nan") for k, v in parts.items()})
                        elif action == "nanloss":
                            import torch

                            loss, parts = result  # + a constant: the gradients are the finite ones of loss
                            nan = torch.tensor(float("nan"))
                            result = (loss + nan, {k: v + nan for k, v in parts.items()})
                        else:
                            act(action, point)
                return result

            return wrapper

        patched = make(original, point, when, mine)
        for owner, name in owners:
            setattr(owner, name, patched)
    return counts


UNSAFE_LOAD = "fault_inject: unsafe torch.load"


def forbid_unsafe_load() -> Counter[str]:
    """Patch `torch.load` to raise on a load that could run code; return the live counts (safe/refused)."""
    import torch

    counts: Counter[str] = Counter()
    real_load = torch.load

    @functools.wraps(real_load)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("weights_only") is False or kwargs.get("pickle_module") is not None:
            counts["refused"] += 1
            what = args[0] if args else kwargs.get("f")
            print(f"{UNSAFE_LOAD} of {what!r}", file=sys.stderr, flush=True)
            raise RuntimeError(f"{UNSAFE_LOAD} of {what!r}")
        counts["safe"] += 1
        return real_load(*args, **kwargs)

    torch.load = guarded
    return counts


def run_train(
    argv: list[str],
    faults: list[str],
    count_file: str | None = None,
    log: str | None = None,
    forbid_unsafe: bool = False,
) -> int:
    """Install the faults and run `scalelora.train.main(argv)`; stderr goes to `log` when given."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    loads = forbid_unsafe_load() if forbid_unsafe else None
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.dup2(fd, 1)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    counts = install(faults, count_all=count_file is not None)
    from scalelora import train

    code = train.main(argv)
    if loads is not None:
        print(
            f"fault_inject: torch.load calls: {loads['safe']} safe, {loads['refused']} refused",
            file=sys.stderr,
            flush=True,
        )
    print(f"fault_inject: exit code {code}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    if count_file:
        Path(count_file).write_text(json.dumps(counts))
    return code


def _child(argv: list[str], faults: list[str], count_file: str | None, log: str | None) -> None:
    sys.exit(run_train(argv, faults, count_file, log))


def forked_context() -> Any:
    """Fork: the child reuses the imports of the test process, so each run starts in milliseconds.

    The child runs torch single-threaded (`run_train`), so a thread pool the parent used is never touched.
    """
    import multiprocessing

    return multiprocessing.get_context("fork")


def run_forked(
    argv: list[str],
    faults: list[str] = (),
    count_file: str | None = None,
    log: str | None = None,
    timeout: float = 300,
) -> int:
    """Run the trainer in a fresh forked process; return its exit code (-9 when SIGKILLed)."""
    process = forked_context().Process(target=_child, args=(list(argv), list(faults), count_file, log))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        raise TimeoutError(f"trainer child still running after {timeout}s: {argv}")
    return process.exitcode


def main(argv: list[str] | None = None) -> int:
    """`fault_inject.py [--fault SPEC]... [--count FILE] [--forbid-unsafe-load] [--] TRAIN_ARGS...`
    (what each rank runs)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    faults, count_file, forbid_unsafe = [], None, False
    while argv[:1] in (["--fault"], ["--count"], ["--forbid-unsafe-load"]):
        if argv[0] == "--forbid-unsafe-load":
            forbid_unsafe, argv = True, argv[1:]
            continue
        option, value, argv = argv[0], argv[1], argv[2:]
        if option == "--fault":
            faults.append(value)
        else:
            count_file = value
    if argv[:1] == ["--"]:
        argv = argv[1:]
    return run_train(argv, faults, count_file, forbid_unsafe=forbid_unsafe)


if __name__ == "__main__":
    sys.exit(main())
