"""`python -m scalelora.sweep`: grid expansion, local runs, skipping finished runs, tables, plot, SLURM array."""

from __future__ import annotations

import csv
import json
import os
import stat
import time
from pathlib import Path

import pytest
import torch

import scalelora.study
from conftest import ROOT, read_summary, run_cli, tiny_overrides
from scalelora.errors import ConfigError
from scalelora.report import machine_line
from scalelora.study.sweep import main as sweep_main
from scalelora.study.sweep import parse_grid, run_name, split_values

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fixed_overrides(model: Path, data: Path) -> list[str]:
    # tiny_overrides without output_dir (the sweep sets it per run)
    return [
        o
        for o in tiny_overrides(model, data, Path("unused"), **{"train.max_steps": 2, "eval.every": 2})
        if not o.startswith("output_dir=")
    ]


def test_grid_parsing():
    axes, fixed = parse_grid(
        ["lora.r=1,2,4", "lora.alpha=16", "data.keep_labels=[a,b],[b,c]", "lora.dropout=0.05,0.1"]
    )
    assert axes == {
        "lora.r": [1, 2, 4],
        "data.keep_labels": [["a", "b"], ["b", "c"]],
        "lora.dropout": [0.05, 0.1],
    }
    assert fixed == ["lora.alpha=16"]  # one value: a fixed override, not a column
    assert split_values("[a,b],[c]") == ["[a,b]", "[c]"]
    assert run_name({"lora.r": 4, "lora.alpha": 16.0, "lora.dropout": 0.05}) == "r4-alpha16-dropout0.05"
    assert run_name({"model.dropout": 0.1, "lora.dropout": 0.2}) == "model.dropout0.1-lora.dropout0.2"
    with pytest.raises(ConfigError, match="twice"):
        parse_grid(["lora.r=1,2", "lora.r=4"])
    with pytest.raises(ConfigError, match="dotted.key=v1,v2"):
        parse_grid(["lora.r"])


def test_bad_sweeps_fail_before_training(tmp_path, capsys):
    assert (
        sweep_main(["--config", "quickstart", "--grid", "lora.rank=1,2", "--out", str(tmp_path / "a")]) == 2
    )
    assert "unknown config key 'lora.rank'; did you mean 'lora.r'?" in capsys.readouterr().err
    assert sweep_main(["--config", "quickstart", "--grid", "lora.r=0,2", "--out", str(tmp_path / "b")]) == 2
    assert "lora.r must be positive" in capsys.readouterr().err
    assert sweep_main(["--config", "quickstart", "--grid", "lora.r=2", "--out", str(tmp_path / "c")]) == 2
    assert "two or more values" in capsys.readouterr().err
    assert not (tmp_path / "a" / "r1").exists()


@pytest.fixture(scope="module")
def local_sweep(tiny_bert, toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "rank"
    args = [
        "--config",
        "quickstart",
        "--grid",
        "lora.r=2,4",
        "--out",
        str(out),
        *fixed_overrides(tiny_bert, toy_data),
    ]
    done = run_cli("scalelora.sweep", args, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out, args


def test_local_sweep_runs_the_grid_and_tabulates_it(local_sweep):
    out, _ = local_sweep
    summaries = {r: read_summary(out / f"r{r}") for r in (2, 4)}
    assert summaries[4]["trainable_params"] > summaries[2]["trainable_params"]
    config = (out / "r4" / "config.yaml").read_text()
    assert "group: rank" in config  # runs of a sweep share a W&B group
    table = json.loads((out / "sweep.json").read_text())
    assert table["axes"] == {"lora.r": [2, 4]} and table["metric"] == "accuracy"
    for row in table["runs"]:
        summary = summaries[row["lora.r"]]
        assert row["status"] == "done"
        assert row["trainable_params"] == summary["trainable_params"]
        assert row["total_params"] == summary["total_params"]
        assert row["trainable_pct"] == pytest.approx(summary["trainable_pct"])
        assert row["accuracy"] == pytest.approx(summary["eval"]["validation"]["accuracy"])
        assert row["macro_f1"] == pytest.approx(summary["eval"]["validation"]["macro_f1"])
        assert row["test_accuracy"] == pytest.approx(summary["eval"]["test"]["accuracy"])
        assert row["train_seconds"] == pytest.approx(summary["train_seconds"])
        # a sweep.json committed as a measurement says where, when and with what each run trained
        assert row["train_tokens"] == summary["train_tokens"] > 0
        assert row["peak_memory_gb"] == summary["peak_memory_gb"]
        assert row["machine"] == summary["machine"] == machine_line()
        assert row["finished"] == summary["finished"] and row["finished"].startswith(
            time.strftime("%Y-", time.gmtime())
        )
        assert row["versions"] == summary["versions"] and row["versions"]["torch"] == torch.__version__
        assert row["commit"] == summary["commit"]
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["lora.r"] for r in rows] == ["2", "4"]
    assert {
        "trainable_params",
        "total_params",
        "trainable_pct",
        "accuracy",
        "macro_f1",
        "train_seconds",
    } <= set(rows[0])
    md = (out / "sweep.md").read_text()
    assert "| r | trainable | total | trainable % | val acc | val macro-F1 |" in md
    assert (
        f"{summaries[2]['trainable_params']:,}" in md
        and "![accuracy against each swept value](sweep.png)" in md
    )
    assert (out / "sweep.png").read_bytes().startswith(PNG_MAGIC)


def test_rerun_skips_complete_runs(local_sweep):
    out, args = local_sweep
    before = (out / "r2" / "summary.json").stat().st_mtime_ns
    done = run_cli("scalelora.sweep", args, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("complete, skipped") == 2
    assert (out / "r2" / "summary.json").stat().st_mtime_ns == before


def test_slurm_submits_the_shipped_array_script_and_a_table_job(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch_calls.txt"
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "$(( $(wc -l < {calls}) + 1000 ))"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "sweep"
    code = sweep_main(
        [
            "--config",
            "quickstart",
            "--grid",
            "lora.r=1,2,4",
            "lora.alpha=16,64",
            "--out",
            str(out),
            "--slurm",
            "--parallel",
            "3",
            "--sbatch=--gres=gpu:1",
            "train.epochs=1",
        ]
    )
    assert code == 0
    assert "submitted array job 1001 (6 tasks) and table job 1002" in capsys.readouterr().out
    shipped = Path(scalelora.study.__file__).parent / "sweep_array.sbatch"  # package data
    first, second = calls.read_text().splitlines()
    # the one copy of the job script is submitted as it is; the per-sweep values are sbatch options
    assert not (out / "sweep_array.sbatch").exists()
    assert first.endswith(f"{shipped} {out.resolve()}")
    assert "--array=0-5%3" in first.split() and "--gres=gpu:1" in first.split()
    assert "--dependency=afterany:1001" in second and "--aggregate" in second and "--gres=gpu:1" in second
    plan = json.loads((out / "sweep_plan.json").read_text())
    assert [r["name"] for r in plan["runs"]] == [
        "r1-alpha16",
        "r1-alpha64",
        "r2-alpha16",
        "r2-alpha64",
        "r4-alpha16",
        "r4-alpha64",
    ]
    assert plan["fixed"] == ["train.epochs=1"]
    script = shipped.read_text()
    assert '--task "$SLURM_ARRAY_TASK_ID"' in script and "scontrol requeue" in script


def test_slurm_without_sbatch_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert (
        sweep_main(
            ["--config", "quickstart", "--grid", "lora.r=1,2", "--out", str(tmp_path / "s"), "--slurm"]
        )
        == 2
    )
    assert "sbatch on PATH" in capsys.readouterr().err


def test_the_array_script_is_package_data_and_slurm_links_to_it():
    """`--slurm` submits the script from the installed package: the wheel must carry it (pyproject's
    package-data names it), and the repository's slurm/ copy is a link to it, not a second copy."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package = ROOT / "src" / "scalelora"
    shipped = package / "study" / "sweep_array.sbatch"
    assert shipped.is_file() and not shipped.is_symlink()
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    relative = shipped.relative_to(package).as_posix()
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns["scalelora"]), relative
    user_facing = ROOT / "slurm" / "sweep_array.sbatch"
    assert user_facing.is_symlink() and user_facing.resolve() == shipped.resolve()
