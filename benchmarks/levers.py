"""One lever at a time: what `train.compile`, thread count and the lazy imports change, measured.

```bash
python benchmarks/levers.py compile --steps 30 --threads 1 --out benchmarks/results/levers-compile.json
python benchmarks/levers.py threads --steps 20 --out benchmarks/results/levers-threads.json
python benchmarks/levers.py imports --before /path/to/old/checkout/src --out benchmarks/results/levers-imports.json
python benchmarks/levers.py adamw --steps 40 --out benchmarks/results/levers-adamw.json
python benchmarks/levers.py adamw --steps 80 --max-length 48 --out benchmarks/results/levers-adamw-48.json
```

- `compile`: scalelora on `cpu-minilm-rt`'s work (MiniLM-L6, rotten_tomatoes, max_length 128, batch 32)
  eager and with `train.compile=true`, each in a fresh process, one log line per step; reports each
  step's seconds, the cumulative curves, the steady-state ratio and the step count where compiling
  pays back its cost (None when the compiled step is not faster).
- `threads`: the same eager run with 1 and with 2 torch threads (`python -m scalelora.bench` sides).
- `imports`: a tiny plain CPU run (2 steps) in fresh processes with this checkout and with `--before`
  (an older `src/`), alternating, plus what importing DeepSpeed and bitsandbytes costs on its own.
- `adamw`: a full fine-tune (`model.mode=full`) on the same work with `train.fused_adamw=false` (torch's
  default AdamW: a loop over tensors on the CPU) and `true` (fused), each in a fresh process, plus `optimizer.step()` alone on
  MiniLM-L6's 22.7M weights with each kernel (median of 20 after 3 warm-up steps).
- `profile`: where a steady-state scalelora step's time goes (torch.profiler self CPU time: matmuls,
  attention, everything else), the first thing to look at before kernel work.
(Length grouping and the dropout kernel are sides of the benchmark itself: `--sides scalelora,scalelora_nogroup,scalelora_torch_dropout`.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bench  # noqa: E402


def rt_spec(steps: int, threads: int | None) -> dict[str, Any]:
    """The work of `cpu-minilm-rt` for the scalelora side, as the benchmark builds it."""
    spec = bench.scenario_spec(bench.SCENARIOS["cpu-minilm-rt"], steps=steps, warmup=0, threads=threads)
    return {**spec, "side": bench.SCALELORA}


def train_run(overrides: list[str], workdir: Path, name: str, threads: int | None) -> dict[str, Any]:
    """One `python -m scalelora.train` in a fresh process; its per-step seconds from metrics.jsonl
    (one train record per step), summary.json's phases and steady state, and its wall time."""
    out = workdir / name
    command = [sys.executable, "-m", "scalelora.train", "--config", "quickstart", *overrides]
    command += [f"output_dir={out}", "train.log_every=1", "checkpoint.every=null"]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env=bench.child_env(threads))
    wall = time.time() - started
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"levers: {name} failed (exit {done.returncode})")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r["split"] == "train"]
    summary = json.loads((out / "summary.json").read_text())
    batch = next(int(o.split("=", 1)[1]) for o in overrides if o.startswith("train.batch_size="))
    return {
        "step_seconds": [batch / r["samples_per_second"] for r in train],
        "phase_seconds": summary["phase_seconds"],
        "steady_state": summary["steady_state"],
        "compiled": summary["compiled"],
        "wall_seconds": wall,
    }


def cumulative(values: list[float]) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


def compile_lever(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    spec = rt_spec(args.steps, args.threads)
    base = bench.scalelora_overrides(spec, workdir / "unused")
    base = [o for o in base if not o.startswith(("output_dir=", "train.timing_skip_steps="))]
    base.append(f"train.timing_skip_steps={args.skip}")
    runs = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        print(f"levers: compile: {name}", file=sys.stderr, flush=True)
        runs[name] = train_run([*base, f"train.compile={flag}"], workdir, name, args.threads)
    eager, compiled = runs["eager"], runs["compiled"]
    cum_e, cum_c = cumulative(eager["step_seconds"]), cumulative(compiled["step_seconds"])
    t_e = eager["steady_state"]["step_seconds"]
    t_c = compiled["steady_state"]["step_seconds"]
    extra = cum_c[-1] - cum_e[-1]  # what compiling cost over the whole run so far
    if extra <= 0:
        break_even: float | None = next(n + 1 for n in range(len(cum_c)) if cum_c[n] <= cum_e[n])
    elif t_c < t_e:
        break_even = len(cum_c) + extra / (t_e - t_c)  # extrapolated at the steady-state step times
    else:
        break_even = None  # the compiled step is not faster: it never pays
    return {
        "lever": "compile",
        "work": "cpu-minilm-rt (MiniLM-L6, rotten_tomatoes, max_length 128, batch 32, fp32), scalelora side",
        "steps": args.steps,
        "steady_state_skipped_steps": args.skip,
        "threads": args.threads,
        "runs": runs,
        "train_seconds": {
            "eager": eager["phase_seconds"]["train"],
            "compiled": compiled["phase_seconds"]["train"],
        },
        "extra_seconds_over_the_run": extra,
        "steady_step_seconds": {"eager": t_e, "compiled": t_c},
        "steady_speedup": t_e / t_c,
        "break_even_steps": break_even,
    }


def adamw_step_seconds(fused: bool, repeats: int = 20) -> float:
    """Median seconds of one AdamW step over MiniLM-L6's parameters, random gradients in place."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from scalelora.config import ModelConfig
    from scalelora.models import resolve_model_path

    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(ModelConfig().name), num_labels=2
    )
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused or None)  # not fused: torch's default
    times = []
    for k in range(repeats + 3):
        started = time.perf_counter()
        optimizer.step()
        if k >= 3:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def adamw_lever(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    spec = rt_spec(args.steps, args.threads)
    if args.max_length:
        spec["max_length"] = args.max_length
    base = bench.scalelora_overrides(spec, workdir / "unused")
    base = [o for o in base if not o.startswith(("output_dir=", "train.timing_skip_steps="))]
    base += [f"train.timing_skip_steps={args.skip}", "model.mode=full", "train.lr=1e-4"]
    runs = {}
    for name, flag in (("default", "false"), ("fused", "true")):
        print(f"levers: adamw: {name}", file=sys.stderr, flush=True)
        runs[name] = train_run([*base, f"train.fused_adamw={flag}"], workdir, name, args.threads)
    steady = {name: run["steady_state"]["step_seconds"] for name, run in runs.items()}
    alone = {"default": adamw_step_seconds(False), "fused": adamw_step_seconds(True)}
    return {
        "lever": "adamw",
        "work": f"cpu-minilm-rt's data (MiniLM-L6, rotten_tomatoes, max_length {spec['max_length']}, batch 32, "
        "fp32), model.mode=full (22.7M trainable), lr 1e-4, scalelora side",
        "steps": args.steps,
        "steady_state_skipped_steps": args.skip,
        "threads": args.threads,
        "runs": runs,
        "steady_step_seconds": steady,
        "steady_speedup": steady["default"] / steady["fused"],
        "optimizer_step_seconds": alone,
        "optimizer_step_speedup": alone["default"] / alone["fused"],
    }


def threads_lever(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    reports = {}
    for threads in (1, 2):
        print(f"levers: threads={threads}", file=sys.stderr, flush=True)
        out = workdir / f"threads-{threads}.json"
        command = [
            sys.executable,
            "-m",
            "scalelora.bench",
            "--scenario",
            "cpu-minilm-rt",
            "--sides",
            "scalelora",
        ]
        command += ["--steps", str(args.steps), "--warmup", "2", "--repeats", str(args.repeats)]
        command += ["--threads", str(threads), "--gemm-seconds", "1", "--out", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, env=bench.child_env(None))
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"levers: threads={threads} failed (exit {done.returncode})")
        report = json.loads(out.read_text())
        side = report["sides"][bench.SCALELORA]
        reports[str(threads)] = {
            "samples_per_second": side["samples_per_second"],
            "step_seconds": side["step_seconds"],
            "achieved_gflops": side["achieved_gflops"],
            "gemm_gflops": report["gemm_gflops"],
            "mfu_measured_gemm": side["mfu_measured_gemm"],
            "repeats": [r["samples_per_second"] for r in side["repeats"]],
        }
    return {
        "lever": "threads",
        "work": "cpu-minilm-rt, scalelora side, eager",
        "steps": args.steps,
        "repeats": args.repeats,
        "by_threads": reports,
        "speedup_2_over_1": reports["2"]["samples_per_second"] / reports["1"]["samples_per_second"],
    }


IMPORT_COST = """
import time, torch, transformers, accelerate
started = time.perf_counter()
import {module}
print(time.perf_counter() - started)
"""


def imports_lever(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import save_tiny_model, write_toy_dataset

    model = save_tiny_model(workdir / "tiny-bert", "bert")
    data = write_toy_dataset(workdir / "toy")
    overrides = [f"model.name={model}", f"data.path={data}", "train.max_steps=2", "data.max_length=32"]
    overrides += ["train.batch_size=8", "eval.sample_predictions=0", "overwrite=true"]
    trees = {"after": str(ROOT / "src"), "before": args.before}
    walls: dict[str, list[float]] = {"after": [], "before": []}
    lines: dict[str, list[str]] = {}
    for repeat in range(args.repeats):
        for name in ("after", "before") if repeat % 2 == 0 else ("before", "after"):
            print(f"levers: imports {repeat + 1}/{args.repeats}: {name}", file=sys.stderr, flush=True)
            env = bench.child_env(args.threads)
            env["PYTHONPATH"] = os.pathsep.join([trees[name], str(ROOT)])
            command = [sys.executable, "-m", "scalelora.train", "--config", "quickstart", *overrides]
            command.append(f"output_dir={workdir / ('run-' + name)}")
            started = time.time()
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            walls[name].append(time.time() - started)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"levers: imports {name} failed (exit {done.returncode})")
            noise = ("Setting accelerator", "FutureWarning", "gemm_4bit")
            output = (done.stdout + done.stderr).splitlines()
            lines[name] = [line for line in output if any(n in line for n in noise)]
    costs = {}
    for module in ("deepspeed", "bitsandbytes"):
        seconds = []
        for _ in range(args.repeats):
            code = IMPORT_COST.format(module=module)
            done = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                env=bench.child_env(args.threads),
            )
            seconds.append(float(done.stdout.strip().splitlines()[-1]))
        costs[module] = {"median_seconds": statistics.median(seconds), "seconds": seconds}
    return {
        "lever": "lazy imports",
        "work": "a tiny plain CPU run (2-layer BERT, 2 steps) from command start to exit",
        "before": args.before,
        "before_commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=args.before
        ).stdout.strip()
        or None,
        "repeats": args.repeats,
        "wall_seconds": {name: {"median": statistics.median(v), "runs": v} for name, v in walls.items()},
        "saved_seconds": statistics.median(walls["before"]) - statistics.median(walls["after"]),
        "noise_lines": lines,
        "import_seconds_after_torch_transformers_accelerate": costs,
    }


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm")


def profile_lever(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Where a steady-state scalelora step spends its time: torch.profiler's self CPU time per operator
    over `--steps` steps after `--skip` warm-up steps, grouped into matmuls, attention and the rest."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from scalelora.config import load_config
    from scalelora.runtime import reset_accelerate_state
    from scalelora.trainer import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = rt_spec(args.skip + args.steps, args.threads)
    cfg = load_config("quickstart", bench.scalelora_overrides(spec, workdir / "profile"))
    reset_accelerate_state()
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        stream = trainer.micro_batches()
        for _ in range(args.skip):
            trainer.train_step([next(stream)])
        batches = [next(stream) for _ in range(args.steps)]
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches:
                trainer.train_step([batch])
        wall = time.perf_counter() - started
    finally:
        trainer.close()
        reset_accelerate_state()
    by_op: dict[str, float] = {}
    for event in prof.key_averages():
        by_op[event.key] = by_op.get(event.key, 0.0) + event.self_cpu_time_total / 1e6
    total = sum(by_op.values())
    groups = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for name, seconds in by_op.items():
        if name in GEMM_OPS:
            groups["matmul"] += seconds
        elif "scaled_dot_product" in name or "flash_attention" in name:
            groups["attention"] += seconds
        else:
            groups["other"] += seconds
    top = sorted(by_op.items(), key=lambda item: -item[1])[:15]
    return {
        "lever": "profile",
        "work": "cpu-minilm-rt, scalelora side, eager, steps after the warm-up (data already loaded)",
        "steps": args.steps,
        "skipped_steps": args.skip,
        "threads": args.threads,
        "tokens": tokens,
        "wall_seconds_under_profiler": wall,
        "self_seconds_total": total,
        "share": {name: seconds / total for name, seconds in groups.items()},
        "top_ops": [{"op": name, "seconds": seconds, "share": seconds / total} for name, seconds in top],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lever", choices=["compile", "threads", "imports", "profile", "adamw"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=10, help="compile, profile: warm-up steps left out")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (compile, imports, profile)")
    parser.add_argument("--before", help="imports: an older checkout's src/ folder to compare with")
    parser.add_argument("--max-length", type=int, help="adamw: data.max_length (default: the scenario's 128)")
    parser.add_argument("--note", help="free text stored in the JSON (what else the machine ran)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.lever == "imports" and not args.before:
        parser.error("imports needs --before OLD_CHECKOUT/src")
    environment = bench.environment()
    with tempfile.TemporaryDirectory(prefix="scalelora-levers-") as tmp:
        levers = {
            "compile": compile_lever,
            "threads": threads_lever,
            "imports": imports_lever,
            "profile": profile_lever,
            "adamw": adamw_lever,
        }
        lever = levers[args.lever]
        report = lever(args, Path(tmp))
    report["environment"] = {**environment, "load_average_end": list(os.getloadavg()), "note": args.note}
    text = json.dumps(report, indent=2) + "\n"
    print(text if not args.out else json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
