"""`python -m scalelora.sweep` (code: `scalelora.study.sweep`) `--config RECIPE --grid lora.r=1,2,4 lora.alpha=16,64 [--out DIR] [--slurm] [key=value ...]`.

Runs every combination of the grid (one `python -m scalelora.train` per run, one after another,
or as a SLURM job array with `--slurm`), skips runs that already finished in DIR, and aggregates
every run's `summary.json` into `sweep.md`, `sweep.csv`, `sweep.json` and `sweep.png`.

A `--grid` entry with one value is a fixed override, so `--grid lora.r=1,2 train.epochs=1` sweeps
only `lora.r`. The plan (recipe, fixed overrides, every run's overrides) is written first to
`DIR/sweep_plan.json`; `--task N` runs entry N of it (what each SLURM array task does) and
`--aggregate` rebuilds the tables from whatever runs are complete.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from scalelora.config import load_config, override_keys
from scalelora.errors import ConfigError, UserError, exit_on_user_error, one_line
from scalelora.report import RUN_COLUMNS, figure, table

PLAN_FILE = "sweep_plan.json"
SBATCH_FILE = "sweep_array.sbatch"  # package data beside this module; slurm/ in the repository links to it


@dataclass
class SweepPlan:
    """Everything needed to (re)run or aggregate a sweep, kept in DIR/sweep_plan.json."""

    recipe: str
    axes: dict[str, list[Any]]
    """Swept keys (more than one value) in command-line order, with their values."""
    fixed: list[str]
    """key=value overrides applied to every run (including one-value grid entries)."""
    runs: list[dict[str, Any]] = field(default_factory=list)
    """One entry per grid point: {"name": folder name, "values": {key: value}}."""
    group: str = ""
    """W&B group shared by every run of the sweep."""
    launcher: list[str] = field(default_factory=lambda: [sys.executable])
    """Command that runs `-m scalelora.train` (e.g. accelerate launch --config_file ...)."""


# --- the grid ------------------------------------------------------------------------------------


def split_values(text: str) -> list[str]:
    """Split `1,2,[a,b]` at top-level commas (commas inside brackets belong to a list value)."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def parse_grid(entries: list[str]) -> tuple[dict[str, list[Any]], list[str]]:
    """Return (swept axes, fixed overrides) for `key=v1,v2,...` entries.

    Raises ConfigError for an entry without `=`, without values, or a key given twice.
    """
    axes: dict[str, list[Any]] = {}
    fixed: list[str] = []
    seen: set[str] = set()
    for entry in entries:
        key, sep, raw = entry.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--grid '{entry}' is not of the form dotted.key=v1,v2,...")
        if key in seen:
            raise ConfigError(f"--grid names '{key}' twice: give all its values in one entry")
        seen.add(key)
        texts = split_values(raw)
        if not texts:
            raise ConfigError(f"--grid '{entry}' has no values")
        values = [yaml.safe_load(t) for t in texts]
        if len(values) == 1:
            fixed.append(f"{key}={texts[0]}")
        else:
            axes[key] = values
    return axes, fixed


def short_keys(keys: list[str]) -> dict[str, str]:
    """`lora.r` -> `r`, unless two keys end alike; then the full dotted key."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def run_name(values: dict[str, Any]) -> str:
    names = short_keys(list(values))
    text = "-".join(f"{names[k]}{format_value(v)}" for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text) or "run"


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "+".join(str(v) for v in value)
    return str(value)


def describe_axes(axes: dict[str, list[Any]]) -> str:
    return ", ".join(f"{k}=" + ",".join(format_value(v) for v in values) for k, values in axes.items())


def override_text(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(str(v) for v in value) + "]"
    return format_value(value)


def build_plan(
    recipe: str, grid: list[str], overrides: list[str], out: Path, launcher: list[str]
) -> SweepPlan:
    """Expand the grid and check that every run's config loads, before any run starts.

    Raises ConfigError for a bad grid entry or a config that does not load for some grid point.
    """
    axes, fixed_from_grid = parse_grid(grid)
    fixed = fixed_from_grid + list(overrides)
    for item in fixed:
        if item.split("=", 1)[0].strip() == "output_dir":
            raise ConfigError("output_dir is set per run by the sweep: use --out DIR instead")
    if not axes:
        raise ConfigError("--grid needs at least one key with two or more values, e.g. lora.r=4,8,16")
    plan = SweepPlan(recipe=recipe, axes=axes, fixed=fixed, group=out.name, launcher=launcher)
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo))
        plan.runs.append({"name": run_name(values), "values": values})
    names = [r["name"] for r in plan.runs]
    if len(set(names)) != len(names):
        raise ConfigError("two grid points map to the same run folder: give the values distinct spellings")
    for run in plan.runs:
        load_config(recipe, run_overrides(plan, run, out))  # fail now, not after an hour of runs
    return plan


def run_overrides(plan: SweepPlan, run: dict[str, Any], out: Path) -> list[str]:
    fixed_keys = set(override_keys(plan.fixed))
    group = [] if "tracking.wandb.group" in fixed_keys else [f"tracking.wandb.group={plan.group}"]
    name = [] if "tracking.wandb.name" in fixed_keys else [f"tracking.wandb.name={plan.group}/{run['name']}"]
    return [
        *plan.fixed,
        *(f"{k}={override_text(v)}" for k, v in run["values"].items()),
        *group,
        *name,
        f"output_dir={out / run['name']}",
        "resume=auto",  # a requeued or re-run sweep continues a half-finished run
    ]


def write_plan(plan: SweepPlan, out: Path) -> None:
    """Write the plan; refuse when DIR holds a different sweep (mixing them would corrupt the table)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / PLAN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if (old["recipe"], old["fixed"]) != (plan.recipe, plan.fixed):
            raise UserError(
                f"{out} holds a sweep of another recipe or other fixed overrides ({path}); use another --out"
            )
        # a grown grid keeps the finished runs; remember runs of the old plan too, so none is lost
        known = {r["name"] for r in plan.runs}
        plan.runs += [r for r in old["runs"] if r["name"] not in known and (out / r["name"]).is_dir()]
        for key, values in old["axes"].items():
            merged = plan.axes.setdefault(key, [])
            merged += [v for v in values if v not in merged]
    path.write_text(json.dumps(asdict(plan), indent=2) + "\n")


def read_plan(out: Path) -> SweepPlan:
    path = out / PLAN_FILE
    if not path.is_file():
        raise UserError(f"{out}: no {PLAN_FILE}; start the sweep with --config and --grid first")
    return SweepPlan(**json.loads(path.read_text()))


def is_complete(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


# --- running -------------------------------------------------------------------------------------


def run_one(plan: SweepPlan, index: int, out: Path, log: Any = print) -> int:
    """Train grid point `index` unless it is already complete; return the trainer's exit code."""
    if not 0 <= index < len(plan.runs):
        raise UserError(f"--task {index}: the sweep in {out} has runs 0..{len(plan.runs) - 1}")
    run = plan.runs[index]
    run_dir = out / run["name"]
    if is_complete(run_dir):
        log(f"scalelora.sweep: [{index + 1}/{len(plan.runs)}] {run['name']}: complete, skipped")
        return 0
    command = [
        *plan.launcher,
        "-m",
        "scalelora.train",
        "--config",
        plan.recipe,
        *run_overrides(plan, run, out),
    ]
    log(f"scalelora.sweep: [{index + 1}/{len(plan.runs)}] {run['name']}: {shlex.join(command[1:])}")
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (run_dir / "train.log").open("a", encoding="utf-8") as handle:
        code = run_forwarding_signals(command, handle)
    status = "done" if code == 0 else f"FAILED (exit {code}, see {run_dir / 'train.log'})"
    log(
        f"scalelora.sweep: [{index + 1}/{len(plan.runs)}] {run['name']}: {status} in {time.perf_counter() - started:.0f}s"
    )
    return code


def run_forwarding_signals(command: list[str], log_file: Any) -> int:
    """Run `command`, passing SIGUSR1/SIGTERM on to it: a preempted SLURM task then checkpoints
    (the trainer exits 75) instead of this process dying and orphaning the training."""
    child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    previous = {}

    def forward(number: int, frame: Any) -> None:
        child.send_signal(number)

    for number in (signal.SIGUSR1, signal.SIGTERM):
        try:
            previous[number] = signal.signal(number, forward)
        except ValueError:  # not the main thread: leave signals alone
            break
    try:
        return child.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def run_local(plan: SweepPlan, out: Path) -> list[str]:
    """Run every grid point in turn; return the names of the runs that failed."""
    failed = []
    for index, run in enumerate(plan.runs):
        if run_one(plan, index, out) != 0:
            failed.append(run["name"])
    return failed


def submit_slurm(plan: SweepPlan, out: Path, parallel: int, sbatch_options: list[str]) -> tuple[str, str]:
    """Submit the packaged sweep_array.sbatch as an array over the plan, and a table job that waits for it.

    `sbatch_options` (e.g. `--gres=gpu:1`, `--partition=x`) go to both sbatch calls' command lines.
    Raises UserError when `sbatch` is not on PATH or refuses the job.
    """
    if shutil.which("sbatch") is None:
        raise UserError("--slurm needs sbatch on PATH (run on a SLURM login node, or drop --slurm)")
    where = out.resolve()
    # sbatch copies the script when it submits, so a file extracted from a zipped install may go after it
    with resources.as_file(resources.files("scalelora.study") / SBATCH_FILE) as script:
        array_id = sbatch(
            [
                "--parsable",
                f"--array=0-{len(plan.runs) - 1}%{parallel}",
                f"--job-name=sweep-{plan.group}",
                f"--output={where}/slurm-%A_%a.out",
                *sbatch_options,
                str(script),
                str(where),
            ]
        )
    aggregate = f"cd {shlex.quote(os.getcwd())} && {shlex.quote(sys.executable)} -m scalelora.sweep --out {shlex.quote(str(where))} --aggregate"
    agg_id = sbatch(
        [
            "--parsable",
            f"--dependency=afterany:{array_id}",
            f"--job-name=sweep-{plan.group}-table",
            f"--output={where}/slurm-aggregate-%j.out",
            *sbatch_options,
            "--wrap",
            aggregate,
        ]
    )
    return array_id, agg_id


def sbatch(args: list[str]) -> str:
    done = subprocess.run(["sbatch", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"sbatch refused the job: {one_line(done.stderr) or done.returncode}")
    return done.stdout.strip().split(";")[0]


# --- aggregation ---------------------------------------------------------------------------------


def collect(plan: SweepPlan, out: Path) -> list[dict[str, Any]]:
    """One row per grid point: swept values, parameter counts, metrics, train time and tokens, peak memory, and
    the machine, finish time, commit and versions of its summary.json (None until it finished)."""
    rows = []
    for run in plan.runs:
        row: dict[str, Any] = dict(run["values"])
        summary_file = out / run["name"] / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
        evals = (summary or {}).get("eval", {})
        row.update(
            {
                "run": run["name"],
                "status": "done" if summary else ("started" if (out / run["name"]).is_dir() else "pending"),
                "trainable_params": summary and summary["trainable_params"],
                "total_params": summary and summary["total_params"],
                "trainable_pct": summary and summary["trainable_pct"],
                "accuracy": evals.get("validation", {}).get("accuracy"),
                "macro_f1": evals.get("validation", {}).get("macro_f1"),
                "test_accuracy": evals.get("test", {}).get("accuracy"),
                "test_macro_f1": evals.get("test", {}).get("macro_f1"),
                "best_step": summary and summary["best"]["step"],
                "train_seconds": summary and summary["train_seconds"],
                "train_tokens": summary and summary.get("train_tokens"),
                "peak_memory_gb": summary and summary.get("peak_memory_gb"),
                # where, when and with what the run trained (a measurement committed from sweep.json says so)
                "machine": summary and summary.get("machine"),
                "finished": summary and summary.get("finished"),
                "commit": summary and summary.get("commit"),
                "versions": summary and summary.get("versions"),
            }
        )
        rows.append(row)
    return rows


METRIC_COLUMNS = (
    "trainable_params",
    "total_params",
    "trainable_pct",
    "accuracy",
    "macro_f1",
    "test_accuracy",
    "test_macro_f1",
    "train_seconds",
)


def cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if column in ("trainable_params", "total_params"):
        return f"{value:,}"
    if column == "trainable_pct":
        return f"{value:.3f}"
    if column == "train_seconds":
        return f"{value:.0f}"
    if isinstance(value, float):
        return (
            f"{value:.4f}"
            if column in ("accuracy", "macro_f1", "test_accuracy", "test_macro_f1")
            else f"{value:g}"
        )
    return format_value(value)


def markdown_table(plan: SweepPlan, rows: list[dict[str, Any]], metric: str) -> str:
    names = short_keys(list(plan.axes))
    columns = [*plan.axes, *METRIC_COLUMNS]
    header = [*(names[k] for k in plan.axes), *RUN_COLUMNS]
    done = [r for r in rows if r[metric] is not None]
    best = max(done, key=lambda r: r[metric]) if done else None
    body = []
    for row in rows:
        cells = [cell(row[c], c) for c in columns]
        body.append([f"**{c}**" for c in cells] if row is best else cells)
    lines = [
        f"# Sweep `{plan.group}`: recipe `{plan.recipe}`",
        "",
        f"Fixed overrides: {', '.join(f'`{f}`' for f in plan.fixed) or 'none'}. "
        f"Metrics are on the validation split (best checkpoint), test where the recipe has one. "
        f"Best by validation {metric} in **bold**.",
        "",
        *table(header, body),
    ]
    missing = [r["run"] for r in rows if r["status"] != "done"]
    if missing:
        lines += ["", f"Not finished ({len(missing)}): {', '.join(missing)}"]
    lines += ["", f"![{metric} against each swept value](sweep.png)", ""]
    return "\n".join(lines)


def write_csv(plan: SweepPlan, rows: list[dict[str, Any]], path: Path) -> None:
    columns = [*plan.axes, "run", "status", *METRIC_COLUMNS, "best_step"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (override_text(v) if isinstance(v, list) else v) for k, v in row.items()})
    path.write_text(buffer.getvalue())


def plot(plan: SweepPlan, rows: list[dict[str, Any]], metric: str, path: Path) -> bool:
    """Metric against each swept value: every run as a dot, the mean per value as a line.

    With `lora.r` swept, trainable parameters go on a second axis. False when no run finished.
    """
    done = [r for r in rows if r[metric] is not None]
    if not done:
        return False
    width = 6.4 if len(plan.axes) == 1 else 4.6 * len(plan.axes)
    with figure(path, ncols=len(plan.axes), figsize=(width, 3.8)) as (fig, axes):
        draw_sweep(fig, axes, plan, rows, done, metric)
    return True


def draw_sweep(
    fig: Any, axes: Any, plan: SweepPlan, rows: list[dict[str, Any]], done: list[dict[str, Any]], metric: str
) -> None:
    names = short_keys(list(plan.axes))
    for ax, key in zip(axes, plan.axes):
        values = plan.axes[key]
        # evenly spaced in grid order: ranks 1,2,4,8,16 read as a log scale, dropouts as categories
        position = {format_value(v): i for i, v in enumerate(values)}
        xs = [position[format_value(r[key])] for r in done]
        ys = [r[metric] for r in done]
        ax.scatter(
            xs, ys, color="tab:blue", alpha=0.45, s=22, label="one run" if len(plan.axes) > 1 else None
        )
        means = []
        for value in values:
            got = [r[metric] for r in done if format_value(r[key]) == format_value(value)]
            if got:
                means.append((position[format_value(value)], sum(got) / len(got)))
        if len(plan.axes) > 1 and means:
            ax.plot(*zip(*means), color="tab:blue", marker="o", label="mean over other keys")
        elif means:
            ax.plot(*zip(*means), color="tab:blue", label=f"validation {metric}")
        for x, y in means:
            ax.annotate(
                f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8
            )
        ax.set_xlim(-0.5, len(values) - 0.5)
        ax.set_xticks([position[format_value(v)] for v in values])
        ax.set_xticklabels([format_value(v) for v in values])
        ax.set_xlabel(key)
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
        if key == "lora.r" and all(r["trainable_params"] for r in done):
            twin = ax.twinx()
            params = sorted({(position[format_value(r[key])], r["trainable_params"]) for r in done})
            twin.plot(
                *zip(*params),
                color="tab:orange",
                linestyle="--",
                marker="s",
                markersize=4,
                label="trainable params",
            )
            handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
            ax.legend(handles=handles, fontsize=8, loc="lower right")
            twin.set_ylabel("trainable parameters", color="tab:orange")
            twin.tick_params(axis="y", colors="tab:orange")
        ax.set_title(f"{metric} vs {names[key]}")
    fig.suptitle(f"sweep {plan.group} ({plan.recipe}, {len(done)}/{len(rows)} runs)", fontsize=10)


def sweep_metric(plan: SweepPlan) -> str:
    metric = load_config(plan.recipe, plan.fixed).eval.metric
    return metric


def aggregate(plan: SweepPlan, out: Path) -> list[dict[str, Any]]:
    """Write sweep.md / sweep.csv / sweep.json / sweep.png from the runs finished so far."""
    rows = collect(plan, out)
    metric = sweep_metric(plan)
    (out / "sweep.json").write_text(
        json.dumps(
            {"recipe": plan.recipe, "axes": plan.axes, "fixed": plan.fixed, "metric": metric, "runs": rows},
            indent=2,
        )
        + "\n"
    )
    write_csv(plan, rows, out / "sweep.csv")
    if not plot(plan, rows, metric, out / "sweep.png"):
        (out / "sweep.png").unlink(missing_ok=True)
    (out / "sweep.md").write_text(markdown_table(plan, rows, metric))
    return rows


# --- the command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scalelora.sweep",
        description="Run a grid of scalelora trainings and tabulate them.",
        epilog="Example: python -m scalelora.sweep --config emotion --grid lora.r=1,2,4,8,16 --out runs/sweeps/emotion_rank "
        "train.epochs=1",
    )
    parser.add_argument("--config", help="recipe name or YAML file (as for scalelora.train)")
    parser.add_argument(
        "--grid", nargs="+", default=[], action="extend", metavar="key=v1,v2", help="values to sweep"
    )
    parser.add_argument("--out", type=Path, help="sweep folder (default runs/sweeps/<recipe>)")
    parser.add_argument(
        "--slurm", action="store_true", help="submit a SLURM job array instead of running here"
    )
    parser.add_argument(
        "--parallel", type=int, default=8, help="--slurm: at most this many array tasks at once"
    )
    parser.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="--slurm: an sbatch option for the array and table jobs, e.g. --gres=gpu:1 (repeatable)",
    )
    parser.add_argument(
        "--launcher",
        default=None,
        help="command that runs each training, e.g. 'accelerate launch --config_file accel_configs/multi_gpu.yaml' "
        "(default: this python)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="write the plan and print the runs, train nothing"
    )
    parser.add_argument(
        "--task", type=int, help="run only grid point N of the plan in --out (one array task)"
    )
    parser.add_argument(
        "--aggregate", action="store_true", help="only rebuild the tables of the sweep in --out"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="fixed overrides for every run")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.task is not None or args.aggregate:
        if args.out is None:
            raise UserError("--task and --aggregate need --out DIR (the sweep folder)")
        plan = read_plan(args.out)
        if args.task is not None:
            return run_one(plan, args.task, args.out)
        aggregate(plan, args.out)
        print(f"scalelora.sweep: wrote {args.out / 'sweep.md'}")
        return 0
    if not args.config or not args.grid:
        raise UserError("--config RECIPE and --grid key=v1,v2,... are required (see --help)")
    out = args.out or Path("runs/sweeps") / Path(args.config).stem
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    plan = build_plan(args.config, args.grid, args.overrides, out, launcher)
    write_plan(plan, out)
    print(f"scalelora.sweep: {len(plan.runs)} runs of {plan.recipe} over {describe_axes(plan.axes)} in {out}")
    if args.dry_run:
        for index, run in enumerate(plan.runs):
            state = "complete" if is_complete(out / run["name"]) else "to run"
            print(f"  [{index}] {run['name']} ({state})")
        return 0
    if args.slurm:
        array_id, agg_id = submit_slurm(plan, out, args.parallel, args.sbatch)
        print(
            f"scalelora.sweep: submitted array job {array_id} ({len(plan.runs)} tasks) and table job {agg_id}"
        )
        return 0
    failed = run_local(plan, out)
    aggregate(plan, out)
    print(f"scalelora.sweep: wrote {out / 'sweep.md'}, sweep.csv, sweep.json, sweep.png")
    if failed:
        print(f"scalelora: error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
