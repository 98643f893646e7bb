"""report.md and curves.png, written at the end of every run and redrawn by `python -m scalelora.report`."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import read_summary, run_cli
from scalelora.report import render_report
from scalelora.tracking import LAST_STEP_FILE, RUN_ID_FILE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished_run(finished_tiny_run):
    return finished_tiny_run


def test_every_run_writes_report_and_curves(finished_run):
    out = finished_run
    summary = read_summary(out)
    report = (out / "report.md").read_text()
    png = (out / "curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000  # a drawn figure, not an empty canvas
    assert "![loss and evaluation metrics against step](curves.png)" in report
    for heading in (
        "## Metrics",
        "## Parameters",
        "## Configuration",
        "## Per-class report (validation)",
        "## Confusion matrix (validation; rows: gold, columns: predicted)",
        "## Per-class report (test)",
        "## Sample predictions (validation), before and after training",
    ):
        assert heading in report, heading
    val, test = summary["eval"]["validation"], summary["eval"]["test"]
    # single-label defaults: calibrated (eval.calibrate=true), no decision rule tuned (tune_thresholds=auto)
    assert "calibrated" in test and "tuned" not in test and summary["calibration"]["biases"] is None
    assert "## Calibration" in report and "## Tuned decision rule" not in report
    assert (out / "reliability.png").read_bytes().startswith(PNG_MAGIC)
    assert f"| validation | {val['accuracy']:.4f} | {val['macro_f1']:.4f} | {val['ece']:.4f} |" in report
    assert f"| test | {test['accuracy']:.4f} | {test['macro_f1']:.4f} | {test['ece']:.4f} |" in report
    assert f"| {summary['trainable_params']:,} | {summary['total_params']:,} |" in report
    labels = summary["labels"]
    for name, row in zip(labels, val["confusion_matrix"]):
        assert f"| {name} | " + " | ".join(str(v) for v in row) + " |" in report
    for name, c in val["per_class"].items():
        assert (
            f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']:,} |"
            in report
        )
    for sample in summary["sample_predictions"]:
        assert f"| {sample['gold']} | {sample['before']} ({sample['before_confidence']:.2f}) |" in report
    best = summary["best"]
    assert f"Best validation {best['metric']}: **{best['value']:.4f}** at step {best['step']}." in report
    assert "| `lora.r` | `8` |" in report


def test_report_cli_redraws_and_refuses_unfinished_runs(finished_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    (copy / "report.md").unlink()
    (copy / "curves.png").unlink()
    done = run_cli("scalelora.report", [str(copy)])
    assert done.returncode == 0, done.stderr
    assert (copy / "report.md").read_text() == (finished_run / "report.md").read_text()
    assert (copy / "curves.png").read_bytes().startswith(PNG_MAGIC)
    (copy / "summary.json").unlink()
    done = run_cli("scalelora.report", [str(copy)])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("scalelora: error: ")
    assert "summary.json" in done.stderr


def test_report_escapes_table_breaking_text(finished_run):
    summary = read_summary(finished_run)
    summary["sample_predictions"][0]["text"] = "a | b\nc " + "x" * 300
    report = render_report(summary, {}, has_curves=False)
    line = next(line for line in report.splitlines() if line.startswith("| a \\| b c"))
    assert len(line) < 250 and "…" in line
    assert "curves.png" not in report
    json.dumps(summary)  # the summary stays plain JSON


def test_wandb_disabled_writes_nothing(finished_run):
    assert (finished_run / "config.yaml").read_text().count("mode: disabled") == 1
    assert not (finished_run / "wandb").exists()
    assert not (finished_run / RUN_ID_FILE).exists() and not (finished_run / LAST_STEP_FILE).exists()


def test_source_commit_is_scalelora_s_own_commit_or_none(tmp_path):
    """The commit a run and a results row record: the scalelora checkout's HEAD, `-dirty` after a change under
    src/; None for a package outside a scalelora checkout, also when that place is inside some other git
    repository (an installed wheel in a virtual environment within a user's own project)."""
    import subprocess

    from scalelora.report import source_commit

    def git(repo, *args: str) -> str:
        command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

    def repository(path, *files: str):
        for name in files:
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text("a\n")
        git(path, "init", "-q")
        git(path, "add", "-A")
        git(path, "commit", "-qm", "x")
        return git(path, "rev-parse", "HEAD")

    checkout = tmp_path / "checkout"
    head = repository(checkout, "pyproject.toml", "src/scalelora/report.py")
    assert source_commit(checkout / "src" / "scalelora") == head
    (checkout / "src" / "scalelora" / "report.py").write_text("b\n")
    assert source_commit(checkout / "src" / "scalelora") == f"{head}-dirty"

    project = tmp_path / "project"
    repository(project, "pyproject.toml", ".venv/lib/python3.11/site-packages/scalelora/report.py")
    assert source_commit(project / ".venv" / "lib" / "python3.11" / "site-packages" / "scalelora") is None
    # a checkout's layout below another repository's top: that repository's commit is not scalelora's
    nested = project / "vendor" / "scalelora"
    for name in ("pyproject.toml", "src/scalelora/report.py"):
        (nested / name).parent.mkdir(parents=True, exist_ok=True)
        (nested / name).write_text("a\n")
    assert source_commit(nested / "src" / "scalelora") is None
