"""Every summary, table and figure the project writes: a run's `summary.json` contents, its `report.md`
and `curves.png` (also `python -m scalelora.report RUN_DIR` to redraw them), and the markdown-table
and figure helpers the study tools share.

A report comes from the files a run already wrote (`summary.json`, `metrics.jsonl`, `config.yaml`),
so it can be rebuilt at any time, for old runs too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from scalelora.config import dotted_get, to_dict
from scalelora.errors import UserError, exit_on_user_error

REPORT_FILE = "report.md"
CURVES_FILE = "curves.png"
RELIABILITY_FILE = "reliability.png"


# What `source_commit` checks for uncommitted changes: the code that runs (the package with its recipes,
# and the results study), not results/ or docs/, which a study rewrites while it runs.
SOURCE_PATHS = ("src", "studies", "pyproject.toml")


def source_commit(package: Path | None = None) -> str | None:
    """The git commit of the running scalelora source, `<hash>-dirty` when tracked files under
    SOURCE_PATHS differ from it; None when the package is not in a scalelora checkout: an installed wheel,
    even one in a virtual environment inside some other git repository, whose commit is not scalelora's."""
    package = (package or Path(__file__).resolve().parent).resolve()  # .../src/scalelora in a checkout
    root = package.parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    if package.parent.name != "src" or not (root / "pyproject.toml").is_file():
        return None
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", *SOURCE_PATHS)
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


def autoconfig_rules(cfg: Any) -> int | None:
    """The version of the data-driven default's rules a run of the `auto` recipe chose its settings by."""
    from scalelora import autoconfig
    from scalelora.config import AUTO_RECIPE

    return autoconfig.RULES_VERSION if cfg.recipe == AUTO_RECIPE else None


def machine_line() -> str:
    """CPU model (or GPU), cores and memory, e.g. `AMD EPYC 7B13, 2 cores, 23.5 GiB`."""
    cpu = platform.processor() or platform.machine()
    memory = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import torch

    device = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, {memory} GiB{device}"


def build_summary(
    cfg: Any,
    state: dict[str, Any],
    facts: dict[str, Any],
    final_eval: dict[str, Any],
    after: list[dict[str, Any]],
) -> dict[str, Any]:
    """The contents of summary.json from the config, the trainer state (plain data), the run's facts
    (see `Trainer.run_facts`), the final metrics per split and the sample predictions after training."""
    import accelerate
    import peft
    import torch
    import transformers

    from scalelora.runtime import peak_memory_scope

    before = {row["text"]: row for row in state["predictions_before"]}
    samples = [
        {
            "text": row["text"],
            "gold": row["gold"],
            "before": before.get(row["text"], {}).get("predicted"),
            "before_confidence": before.get(row["text"], {}).get("confidence"),
            "after": row["predicted"],
            "after_confidence": row["confidence"],
        }
        for row in after
    ]
    params = facts["params"]
    return {
        "recipe": cfg.recipe,
        "model": cfg.model.name,
        "dataset": cfg.data.path,
        "data_source": facts["data_source"],
        "mode": cfg.model.mode,
        "labels": facts["labels"],
        "problem_type": facts.get("problem_type", "single_label"),
        "calibration": facts.get("calibration"),
        "num_train_examples": facts["num_train_examples"],
        "dropped_empty": facts["dropped_empty"],
        # rows longer than data.max_length, cut to it: {split: {"rows": n, "share": x}}
        "truncated": facts.get("truncated", {}),
        "long_text": facts.get("long_text"),  # longtext.describe: null under data.long_text=truncate
        "trainable_params": params.trainable,
        "total_params": params.total,
        "trainable_pct": params.pct,
        "best": {"metric": cfg.eval.metric, "value": state["best_value"], "step": state["best_step"]},
        "eval": final_eval,
        "global_step": state["global_step"],
        "total_steps": facts["total_steps"],
        "samples_per_second": state["train_samples"] / max(state["step_seconds"], 1e-9),
        "tokens_per_second": state["train_tokens"] / max(state["step_seconds"], 1e-9),
        "train_seconds": state["wall_seconds"],  # a resumed run: its checkpoints' and then its last process's
        # the optimizer step each resume continued from ([] for a run in one process): what is measured per
        # process (peak_memory_gb, steady_state, phase_seconds) is the last process's alone
        "resumed_at_steps": state["resumed_at"],
        "train_tokens": state["train_tokens"],  # real (unpadded) tokens of every training step, all ranks
        "steady_state": facts.get("steady_state"),
        "phase_seconds": facts.get("phase_seconds"),
        "compiled": facts.get("compiled"),
        "nonfinite_skipped": state["nonfinite_skipped"],
        "world_size": facts["world_size"],
        "precision": cfg.train.precision,
        "distributed_type": facts["distributed_type"],
        "deepspeed": facts["deepspeed"],
        "class_weights": facts["class_weights"],
        "peak_memory_gb": facts["peak_memory_gb"],
        # `run`: this run's own peak; `process`: since its process started (the host peak where
        # /proc/self/clear_refs cannot be written)
        "peak_memory_scope": peak_memory_scope(facts["peak_memory_gb"]),
        "seed": cfg.seed,
        "commit": source_commit(),
        # where and when the run finished, for any table built from summaries (sweeps, studies)
        "machine": machine_line(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # the auto recipe's settings come from rules that no key names: their version says which
        "autoconfig_rules": autoconfig_rules(cfg),
        "distill": to_dict(cfg)["distill"] if cfg.distill.enabled else None,
        "versions": {
            "scalelora": __import__("scalelora").__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "accelerate": accelerate.__version__,
            "python": sys.version.split()[0],
        },
        "sample_predictions": samples,
    }


def final_line(summary: dict[str, Any]) -> str:
    """`(N samples/s): validation accuracy=... macro_f1=...  test ...` for the run's last log line."""
    metrics = "  ".join(
        f"{split} accuracy={m['accuracy']:.4f} macro_f1={m['macro_f1']:.4f}"
        + (f" (tuned {m['tuned']['macro_f1']:.4f})" if "tuned" in m else "")
        for split, m in summary["eval"].items()
    )
    return f"({summary['samples_per_second']:.1f} samples/s): {metrics}"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def figure(
    path: Path, ncols: int = 1, figsize: tuple[float, float] = (6.4, 3.8), **kwargs: Any
) -> Iterator[Any]:
    """A row of `ncols` axes (a numpy array), saved as a PNG at `path` when the block ends, then closed.

    Every figure the project writes goes through here (headless backend, one size and resolution).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False, **kwargs)
    try:
        yield fig, axes[0]
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def plot_curves(records: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> bool:
    """Train loss (and learning rate) and the validation metrics against the optimizer step.

    False (and no file) when the run logged nothing to draw.
    """
    train = [r for r in records if r.get("split") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("split") == "validation"]
    if not train and not evals:
        return False
    with figure(path, ncols=2, figsize=(10, 3.8), sharex=True) as (fig, (loss_ax, metric_ax)):
        draw_curves(fig, loss_ax, metric_ax, train, evals, summary)
    return True


def draw_curves(
    fig: Any,
    loss_ax: Any,
    metric_ax: Any,
    train: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    summary: dict[str, Any],
) -> None:
    if train:
        steps = [r["step"] for r in train]
        loss_ax.plot(
            steps, [r["loss"] for r in train], color="tab:blue", marker="." if len(train) < 40 else None
        )
        loss_ax.set_ylabel("train loss", color="tab:blue")
        if any(r.get("lr") is not None for r in train):
            lr_ax = loss_ax.twinx()
            lr_ax.plot(steps, [r.get("lr") for r in train], color="tab:gray", linestyle=":", linewidth=1)
            lr_ax.set_ylabel("learning rate", color="tab:gray")
            lr_ax.tick_params(axis="y", colors="tab:gray", labelsize=8)
            lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
            lr_ax.set_ylim(bottom=0)
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_title("training loss (mean over each logging window)")
    loss_ax.grid(alpha=0.3)
    best = summary.get("best", {})
    for key, color in (("accuracy", "tab:green"), ("macro_f1", "tab:purple")):
        points = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
        if points:
            metric_ax.plot(*zip(*points), color=color, marker="o", markersize=4, label=f"validation {key}")
        test = summary.get("eval", {}).get("test", {}).get(key)
        if test is not None:
            metric_ax.axhline(
                test, color=color, linestyle="--", linewidth=1, alpha=0.7, label=f"test {key} (final)"
            )
    if best.get("step") is not None and best.get("value") is not None:
        metric_ax.scatter(
            [best["step"]],
            [best["value"]],
            s=140,
            facecolors="none",
            edgecolors="black",
            zorder=3,
            label=f"best {best['metric']} {best['value']:.3f} (step {best['step']})",
        )
    last_step = max(r["step"] for r in train + evals)
    metric_ax.set_xlim(0, last_step * 1.04 + 0.5)
    metric_ax.set_xlabel("optimizer step")
    metric_ax.set_title("evaluation")
    metric_ax.grid(alpha=0.3)
    if metric_ax.get_legend_handles_labels()[0]:
        metric_ax.legend(fontsize=8, loc="best")
    fig.suptitle(
        f"{summary.get('recipe') or 'run'}: {summary.get('model')} on {summary.get('dataset')} ({summary.get('mode')})",
        fontsize=10,
    )


def plot_reliability(summary: dict[str, Any], path: Path) -> bool:
    """The reliability diagram of each split: observed frequency against confidence per bin, before
    and after temperature scaling. False (and no file) when the summary holds no bins."""
    splits = [(name, m) for name, m in summary.get("eval", {}).items() if m.get("reliability")]
    if not splits:
        return False
    multi = summary.get("problem_type") == "multi_label"
    with figure(path, ncols=len(splits), figsize=(4.6 * len(splits), 4.2)) as (fig, axes):
        for ax, (name, metrics) in zip(axes, splits):
            ax.plot(
                [0, 1], [0, 1], color="tab:gray", linestyle=":", linewidth=1, label="perfectly calibrated"
            )
            curves = [("raw", metrics["reliability"], metrics.get("ece"), "tab:red")]
            calibrated = metrics.get("calibrated")
            if calibrated:
                label = f"T = {calibrated['temperature']:.2f}"
                curves.append((label, calibrated["reliability"], calibrated.get("ece"), "tab:blue"))
            for label, bins, ece, color in curves:
                total = max(sum(bins["count"]), 1)
                ax.plot(
                    bins["confidence"],
                    bins["frequency"],
                    color=color,
                    marker="o",
                    markersize=3,
                    label=f"{label} (ECE {fmt(ece, 3)})",
                )
                ax.scatter(
                    bins["confidence"],
                    bins["frequency"],
                    s=[400 * n / total for n in bins["count"]],
                    color=color,
                    alpha=0.2,
                )
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("predicted probability" if multi else "confidence (top label)")
            ax.set_ylabel("how often the label is present" if multi else "accuracy")
            ax.set_title(f"{name} ({metrics.get('num_examples', '?')} examples)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper left")
        fig.suptitle("reliability: 15 equal-width bins, marker area = share of predictions", fontsize=10)
    return True


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# The metric columns of the study tools' tables (pipeline rows, sweep runs), in this order.
RUN_COLUMNS = [
    "trainable",
    "total",
    "trainable %",
    "val acc",
    "val macro-F1",
    "test acc",
    "test macro-F1",
    "train s",
]


def table(header: list[str], rows: list[list[Any]], align: str = "---:") -> list[str]:
    """A markdown table (the project's only table helper): strings as they are, numbers through `fmt`;
    the first column left-aligned, the others by `align`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", *[align] * (len(header) - 1)]) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines


def escape(text: str, limit: int = 120) -> str:
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def config_rows(config: dict[str, Any]) -> list[list[Any]]:
    keys = [
        "model.name",
        "model.mode",
        "lora.r",
        "lora.alpha",
        "lora.dropout",
        "lora.target_modules",
        "data.path",
        "data.keep_labels",
        "data.max_train_samples",
        "data.max_length",
        "train.epochs",
        "train.max_steps",
        "train.batch_size",
        "train.grad_accum",
        "train.lr",
        "train.scheduler",
        "train.precision",
        "eval.metric",
        "distill.enabled",
        "seed",
    ]
    rows = []
    for key in keys:
        node = dotted_get(config, key, None)
        if node is not None or key == "lora.target_modules":
            rows.append([f"`{key}`", f"`{node if node is not None else 'preset'}`"])
    return rows


def _names(value: Any) -> str:
    """A label (single-label) or a label set (multi-label) as report text."""
    if isinstance(value, list):
        return ", ".join(value) if value else "(none)"
    return str(value)


def _confidence(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(fmt(v, 2) for v in value) if value else "-"
    return fmt(value, 2)


def calibration_lines(summary: dict[str, Any], has_reliability: bool) -> list[str]:
    """The report's sections on the tuned decision rule and on temperature scaling (empty without them)."""
    evals = summary.get("eval", {})
    calibration = summary.get("calibration") or {}
    multi = summary.get("problem_type") == "multi_label"
    lines: list[str] = []
    if any("tuned" in m for m in evals.values()):
        rule = "per-label thresholds" if multi else "per-class logit biases"
        lines += [
            "",
            "## Tuned decision rule",
            "",
            f"{rule.capitalize()} tuned on the validation split for {calibration.get('tuned_for')} and stored "
            "with the model (`calibration.json`); `predict` uses them. The validation numbers are on the split "
            "the rule was fitted to; test is held out.",
            "",
        ]
        rows = []
        for split, m in evals.items():
            t = m.get("tuned")
            if t:
                rows.append(
                    [
                        split,
                        m["accuracy"],
                        t["accuracy"],
                        m["macro_f1"],
                        t["macro_f1"],
                        m.get("micro_f1"),
                        t["micro_f1"],
                    ]
                )
        default = "p >= 0.5" if multi else "argmax"
        lines += table(
            [
                "split",
                f"accuracy ({default})",
                "accuracy (tuned)",
                f"macro-F1 ({default})",
                "macro-F1 (tuned)",
                f"micro-F1 ({default})",
                "micro-F1 (tuned)",
            ],
            rows,
        )
    if any("calibrated" in m for m in evals.values()):
        lines += [
            "",
            "## Calibration",
            "",
            f"Temperature scaling fitted on the validation split: T = **{fmt(calibration.get('temperature'), 3)}** "
            "(probabilities from logits / T). `predict` and a merged export give the calibrated probabilities.",
            "",
        ]
        lines += table(
            ["split", "ECE before", "ECE after", "NLL before", "NLL after"],
            [
                [split, m.get("ece"), m["calibrated"]["ece"], m.get("nll"), m["calibrated"]["nll"]]
                for split, m in evals.items()
                if "calibrated" in m
            ],
        )
    if has_reliability:
        lines += ["", f"![reliability diagram per split, before and after calibration]({RELIABILITY_FILE})"]
    return lines


def per_label_lines(summary: dict[str, Any]) -> list[str]:
    """Per-class report, tuned per-class report and confusion (matrix, or per label) of each split."""
    labels = summary.get("labels", [])
    calibration = summary.get("calibration") or {}
    multi = summary.get("problem_type") == "multi_label"
    rule = calibration.get("thresholds") if multi else calibration.get("biases")
    lines: list[str] = []
    for split, metrics in summary.get("eval", {}).items():
        per_class = metrics.get("per_class", {})
        if per_class:
            lines += ["", f"## Per-class report ({split})", ""]
            lines += table(
                ["label", "precision", "recall", "F1", "support"],
                [[name, c["precision"], c["recall"], c["f1"], c["support"]] for name, c in per_class.items()],
            )
        tuned = (metrics.get("tuned") or {}).get("per_class")
        if tuned and rule:
            what = "threshold" if multi else "bias"
            lines += ["", f"## Per-class report ({split}, tuned {what}s)", ""]
            lines += table(
                ["label", what, "precision", "recall", "F1", "support"],
                [
                    [name, value, c["precision"], c["recall"], c["f1"], c["support"]]
                    for (name, c), value in zip(tuned.items(), rule)
                ],
            )
        matrix = metrics.get("confusion_matrix")
        if matrix:
            lines += ["", f"## Confusion matrix ({split}; rows: gold, columns: predicted)", ""]
            lines += table(
                ["gold \\ predicted", *labels],
                [[name, *(str(v) for v in row)] for name, row in zip(labels, matrix)],
            )
        per_label = metrics.get("confusion_per_label")
        if per_label:
            lines += ["", f"## Confusion per label ({split}; p >= 0.5)", ""]
            lines += table(
                ["label", "TP", "FP", "FN", "TN"],
                [[name, c["tp"], c["fp"], c["fn"], c["tn"]] for name, c in per_label.items()],
            )
    return lines


def render_report(
    summary: dict[str, Any], config: dict[str, Any], has_curves: bool, has_reliability: bool = False
) -> str:
    """The markdown report of one run (see the module docstring for its sources)."""
    lines = headline_lines(summary, has_curves)
    lines += metrics_lines(summary)
    lines += truncation_lines(summary, config)
    lines += calibration_lines(summary, has_reliability)
    lines += parameter_lines(summary)
    lines += ["", "## Configuration", ""]
    lines += table(["key", "value"], config_rows(config), align="---")
    lines += per_label_lines(summary)
    lines += sample_prediction_lines(summary)
    versions = summary.get("versions", {})
    if versions:
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."]
    return "\n".join(lines) + "\n"


def headline_lines(summary: dict[str, Any], has_curves: bool) -> list[str]:
    """The title, what ran on what (steps, examples, time, throughput, processes) and the best evaluation."""
    best = summary.get("best", {})
    lines = [
        f"# Run report: {summary.get('recipe') or 'run'}",
        "",
        f"{summary.get('model')} ({summary.get('mode')}) on **{summary.get('dataset')}**, "
        f"{len(summary.get('labels', []))} labels; {fmt(summary.get('global_step'))} optimizer steps on "
        f"{fmt(summary.get('num_train_examples'))} training examples in {fmt(summary.get('train_seconds'), 1)} s "
        f"({fmt(summary.get('samples_per_second'), 1)} samples/s, {fmt(summary.get('tokens_per_second'), 0)} tokens/s), "
        f"{summary.get('world_size', 1)} process(es), precision `{summary.get('precision')}`, seed {summary.get('seed')}.",
        "",
        f"Best validation {best.get('metric')}: **{fmt(best.get('value'))}** at step {fmt(best.get('step'))}.",
        "",
    ]
    if has_curves:
        lines += [f"![loss and evaluation metrics against step]({CURVES_FILE})", ""]
    return lines


def metrics_lines(summary: dict[str, Any]) -> list[str]:
    """The metrics of each evaluated split, the extra metrics, and what ECE and NLL mean here."""
    multi = summary.get("problem_type") == "multi_label"
    evals = summary.get("eval", {})
    lines = ["## Metrics", ""]
    lines += table(
        [
            "split",
            "subset accuracy" if multi else "accuracy",
            "macro-F1",
            "ECE (15 bins)",
            "micro-F1",
            "NLL",
            "examples",
        ],
        [
            [
                split,
                m.get("accuracy"),
                m.get("macro_f1"),
                m.get("ece"),
                m.get("micro_f1"),
                m.get("nll"),
                m.get("num_examples"),
            ]
            for split, m in evals.items()
        ],
    )
    extra_keys = list(dict.fromkeys(k for m in evals.values() for k in m.get("extra_metrics", [])))
    if extra_keys:
        lines += ["", "Extra metrics (`eval.extra_metrics`, computed by the `evaluate` library):", ""]
        lines += table(
            ["split", *extra_keys], [[split, *(m.get(k) for k in extra_keys)] for split, m in evals.items()]
        )
    if multi:
        lines += [
            "",
            f"{len(summary.get('labels', []))} labels, one sigmoid each; the metrics above use p >= 0.5 for "
            "every label. Subset accuracy counts rows whose whole label set is right; ECE here pools every "
            "per-label probability against whether that label is present; NLL is the mean over rows of the "
            "binary cross-entropy summed over labels.",
        ]
    else:
        lines += [
            "",
            "ECE is the expected calibration error of the top-label confidence: 0 means the model is "
            "right exactly as often as it is confident. NLL is the mean negative log-likelihood of the gold label.",
        ]
    return lines


def truncation_lines(summary: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """How many texts of each split were longer than data.max_length and cut to it (runs from before
    summary.json recorded it: nothing)."""
    truncated = summary.get("truncated")
    if not truncated:
        return []
    max_length = dotted_get(config, "data.max_length", None)
    shown = ", ".join(f"{split} {fmt(t['rows'])} ({100 * t['share']:.1f}%)" for split, t in truncated.items())
    mode = dotted_get(config, "data.long_text", "truncate")
    if mode == "head_tail":
        what = f"Texts longer than `data.max_length`={max_length} tokens, their middle cut (`data.long_text=head_tail`)"
    elif mode == "chunk":
        chunks = dotted_get(config, "data.max_chunks", None)
        what = (
            f"Texts needing more than `data.max_chunks`={chunks} windows of {max_length} tokens, their middle "
            "windows dropped (`data.long_text=chunk`)"
        )
    else:
        what = f"Texts longer than `data.max_length`={max_length} tokens, truncated"
    return ["", f"{what}: {shown}."]


def parameter_lines(summary: dict[str, Any]) -> list[str]:
    lines = ["", "## Parameters", ""]
    lines += table(
        ["trainable", "total", "trainable %"],
        [
            [
                summary.get("trainable_params"),
                summary.get("total_params"),
                f"{summary.get('trainable_pct', 0):.4f}",
            ]
        ],
    )
    return lines


def sample_prediction_lines(summary: dict[str, Any]) -> list[str]:
    """The validation samples with their gold label and the predictions before and after training."""
    samples = summary.get("sample_predictions", [])
    if not samples:
        return []
    rows = []
    for row in samples:
        same = (
            sorted(row["after"]) == sorted(row["gold"])
            if isinstance(row["gold"], list)
            else row["after"] == row["gold"]
        )
        mark = "✓" if same else "✗"
        before = row.get("before")
        rows.append(
            [
                escape(row["text"]),
                escape(_names(row["gold"])),
                f"{escape(_names(before))} ({_confidence(row['before_confidence'])})"
                if before is not None
                else "-",
                f"{mark} {escape(_names(row['after']))} ({_confidence(row['after_confidence'])})",
            ]
        )
    lines = ["", "## Sample predictions (validation), before and after training", ""]
    lines += table(["text", "gold", "before (confidence)", "after (confidence)"], rows, align="---")
    return lines


def write_report(
    run_dir: Path, summary: dict[str, Any] | None = None, log: Callable[[str], None] = print
) -> Path:
    """Write `report.md` and `curves.png` into `run_dir` from its files (or the given summary).

    Raises UserError when `run_dir` holds no summary.json and none is given.
    """
    if summary is None:
        path = run_dir / "summary.json"
        if not path.is_file():
            raise UserError(f"{run_dir}: no summary.json (the run has not finished); nothing to report")
        summary = json.loads(path.read_text())
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    has_curves = plot_curves(read_metrics(run_dir), summary, run_dir / CURVES_FILE)
    has_reliability = plot_reliability(summary, run_dir / RELIABILITY_FILE)
    report = run_dir / REPORT_FILE
    report.write_text(render_report(summary, config or {}, has_curves, has_reliability), encoding="utf-8")
    figures = [
        name for name, drawn in ((CURVES_FILE, has_curves), (RELIABILITY_FILE, has_reliability)) if drawn
    ]
    log(f"scalelora: wrote {report}" + (f" and {', '.join(figures)}" if figures else ""))
    return report


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scalelora.report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="output_dir of a finished run"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        write_report(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
