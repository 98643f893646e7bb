"""Figures and tables for docs/performance.md, from the committed benchmark JSON only.

```bash
python benchmarks/plot.py benchmarks/results/cpu-minilm-rt.json --png docs/img/bench-cpu-minilm-rt.png
python benchmarks/plot.py benchmarks/results/cpu-minilm-ttr.json --png docs/img/bench-time-to-result.png
python benchmarks/plot.py benchmarks/results/cpu-minilm-rt.json --table   # markdown rows for the docs
```

A throughput report gives a bar per configuration (median samples/s, the repeats' range as error bars,
real-token share and share of measured GEMM in the labels); a `--time-to-result` report gives one
stacked bar per side (seconds by phase).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from scalelora.report import figure, table  # noqa: E402

LABELS = {
    "hf_trainer": "HF Trainer\n(defaults)",
    "hf_trainer_grouped": "HF Trainer\n(group_by_length)",
    "scalelora": "scalelora",
    "scalelora_nogroup": "scalelora\n(no grouping)",
    "scalelora_torch_dropout": "scalelora\n(torch dropout)",
    "scalelora_kd_cache": "scalelora\nKD from cache",
    "scalelora_kd_self": "scalelora\nKD from self",
    "scalelora_script": "scalelora",
    "hf_trainer_script": "HF Trainer script",
}
PHASE_COLOURS = {
    "startup": "#9e9e9e",
    "data": "#8c6d31",
    "model": "#bcbd22",
    "train": "#1f77b4",
    "eval": "#ff7f0e",
    "save": "#2ca02c",
    "other": "#d3d3d3",
}


def plot_throughput(report: dict[str, Any], path: Path) -> None:
    sides = list(report["sides"])
    medians = [report["sides"][s]["samples_per_second"] for s in sides]
    repeats = [[r["samples_per_second"] for r in report["sides"][s]["repeats"]] for s in sides]
    low = [m - min(r) for m, r in zip(medians, repeats)]
    high = [max(r) - m for m, r in zip(medians, repeats)]
    colours = ["#ff7f0e" if s.startswith("hf_") else "#1f77b4" for s in sides]
    with figure(path, figsize=(6.8, 3.9)) as (_, axes):
        ax = axes[0]
        bars = ax.bar(range(len(sides)), medians, yerr=[low, high], color=colours, capsize=4)
        for bar, side in zip(bars, sides):
            entry = report["sides"][side]
            share = entry.get("mfu_measured_gemm")
            text = f"{bar.get_height():.1f}\npad eff {entry['padding_efficiency']:.2f}"
            if share is not None:
                text += f"\n{100 * share:.0f}% of GEMM"
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 3),
                textcoords="offset points",
            )
        ax.set_xticks(range(len(sides)), [LABELS.get(s, s) for s in sides], fontsize=8)
        ax.set_ylabel("samples/s (median, range of repeats)")
        ax.set_ylim(0, max(medians) * 1.35)
        threads = report.get("threads") or "default"
        ax.set_title(
            f"{report['scenario']}: {report['steps']} steps, {report['repeats']} repeats, "
            f"{threads} thread(s), {report['device']}",
            fontsize=9,
        )


def plot_time_to_result(report: dict[str, Any], path: Path) -> None:
    sides = list(report["sides"])
    with figure(path, figsize=(6.8, 2.6)) as (_, axes):
        ax = axes[0]
        for row, side in enumerate(sides):
            entry = report["sides"][side]
            phases = {**entry["phase_seconds"], "other": max(entry["other_seconds"], 0.0)}
            left = 0.0
            for name, seconds in phases.items():
                ax.barh(row, seconds, left=left, color=PHASE_COLOURS[name], label=name if row == 0 else None)
                left += seconds
            ax.annotate(
                f"{entry['wall_seconds']:.0f} s",
                (left, row),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
        ax.set_yticks(range(len(sides)), [LABELS.get(s, s).replace("\n", " ") for s in sides], fontsize=8)
        ax.set_xlabel("seconds from command start (median of repeats)")
        ax.set_xlim(0, max(report["sides"][s]["wall_seconds"] for s in sides) * 1.15)
        ax.legend(fontsize=7, ncol=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), frameon=False)
        ax.set_title(f"time to result, {report['device']}", fontsize=9)


def throughput_table(report: dict[str, Any]) -> list[str]:
    rows = []
    comparator = report.get("comparator")
    for side, entry in report["sides"].items():
        repeats = ", ".join(f"{r['samples_per_second']:.1f}" for r in entry["repeats"])
        ratio = "1 (comparator)" if side == comparator else report["ratios"].get(side)
        share = entry.get("mfu_measured_gemm")
        rows.append(
            [
                f"`{side}`",
                f"{entry['samples_per_second']:.1f} ({repeats})",
                f"{entry['tokens_per_second']:.0f}",
                f"{entry['step_seconds']:.3f}",
                f"{entry['padding_efficiency']:.2f}",
                f"{entry['peak_memory_bytes'] / 2**20:.0f}",
                "-" if entry["achieved_gflops"] is None else f"{entry['achieved_gflops']:.1f}",
                "-" if share is None else f"{100 * share:.1f}%",
                ratio if isinstance(ratio, str) else ("-" if ratio is None else f"{ratio:.3f}"),
            ]
        )
    header = [
        "side",
        "samples/s (repeats)",
        "tokens/s",
        "s/step",
        "pad eff",
        "peak RSS MiB",
        "GFLOP/s",
        "of GEMM",
        f"x {comparator}" if comparator else "x comparator",
    ]
    return table(header, rows)


def time_to_result_table(report: dict[str, Any]) -> list[str]:
    rows = []
    for side, entry in report["sides"].items():
        phases = entry["phase_seconds"]
        rows.append(
            [
                f"`{side}`",
                f"{entry['wall_seconds']:.1f}",
                *[f"{phases[n]:.1f}" for n in phases],
                f"{entry['other_seconds']:.1f}",
                f"{entry['peak_rss_bytes'] / 2**20:.0f}",
                f"{entry['validation_accuracy']:.4f}",
                f"{entry['test_accuracy']:.4f}",
            ]
        )
    phases = list(next(iter(report["sides"].values()))["phase_seconds"])
    header = ["side", "wall s", *phases, "other", "peak RSS MiB", "val acc", "test acc"]
    return table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="a JSON written by python -m scalelora.bench --out")
    parser.add_argument("--png", type=Path, help="write the figure here")
    parser.add_argument("--table", action="store_true", help="print the markdown table rows")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    ttr = report.get("mode") == "time_to_result"
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        (plot_time_to_result if ttr else plot_throughput)(report, args.png)
        print(f"wrote {args.png}")
    if args.table:
        print("\n".join(time_to_result_table(report) if ttr else throughput_table(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
