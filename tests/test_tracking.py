"""W&B tracking with mode=offline: the run's own .wandb file is read back (wandb is not mocked)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import read_summary, run_cli, tiny_overrides
from scalelora.tracking import LAST_STEP_FILE, RUN_ID_FILE, wandb_mode
from wandb_records import offline_runs, read_wandb_run

pytest.importorskip("wandb")

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 hex chars, the shape of a real key


def train(model: Path, data: Path, out: Path, *extra: str, env: dict | None = None):
    args = ["--config", "quickstart", *tiny_overrides(model, data, out), *extra]
    done = run_cli("scalelora.train", args, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def history_steps(run: dict, key: str) -> list[int]:
    return [row["_step"] for row in run["history"] if key in row]


@pytest.fixture(scope="module")
def offline_run(tiny_bert, toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("wandb") / "run"
    done = train(
        tiny_bert,
        toy_data,
        out,
        "tracking.report_to=wandb",
        "tracking.wandb.mode=offline",
        "tracking.wandb.group=g1",
        "tracking.wandb.tags=[a,b]",
        "checkpoint.every=2",
        "checkpoint.keep_last=3",
        env={"WANDB_API_KEY": FAKE_KEY},
    )
    return out, done


def test_offline_run_holds_metrics_config_and_final_summary(offline_run):
    out, _ = offline_run
    (path,) = offline_runs(out)
    run = read_wandb_run(path)
    assert run["run_id"] == (out / RUN_ID_FILE).read_text().strip()
    assert run["group"] == "g1"
    # keyed by optimizer step: log_every=2, eval.every=3, max_steps=6
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_second",
        "train/tokens_per_second",
    ):
        assert history_steps(run, key) == [2, 4, 6], key
    assert history_steps(run, "eval/accuracy") == [3, 6]
    assert history_steps(run, "eval/macro_f1") == [3, 6]
    train_rows = [row for row in run["history"] if "train/tokens_per_second" in row]
    assert all(row["train/tokens_per_second"] > row["train/samples_per_second"] > 0 for row in train_rows)
    # the resolved config
    assert run["config"]["lora"]["r"] == 8 and run["config"]["train"]["max_steps"] == 6
    summary, written = run["summary"], read_summary(out)
    assert summary["params/trainable"] == written["trainable_params"]
    assert summary["params/total"] == written["total_params"]
    assert summary["params/trainable_pct"] == pytest.approx(written["trainable_pct"])
    assert summary["best/step"] == written["best"]["step"]
    assert summary["best/value"] == pytest.approx(written["best"]["value"])
    assert summary["final/test/accuracy"] == pytest.approx(written["eval"]["test"]["accuracy"])
    assert summary["final/validation/macro_f1"] == pytest.approx(written["eval"]["validation"]["macro_f1"])
    # confusion matrices and the before/after prediction table, at the last step
    final = [row for row in run["history"] if "sample_predictions/path" in row]
    assert len(final) == 1 and final[0]["_step"] == 6
    for split in ("validation", "test"):
        assert any(k.startswith(f"confusion_matrix/{split}") for k in final[0]), sorted(final[0])
    table_file = path.parent / "files" / final[0]["sample_predictions/path"]
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["text", "gold", "before", "before_confidence", "after", "after_confidence"]
    assert [row[0] for row in table["data"]] == [s["text"] for s in written["sample_predictions"]]
    assert [row[4] for row in table["data"]] == [s["after"] for s in written["sample_predictions"]]


def test_api_key_is_never_written_or_printed(offline_run):
    out, done = offline_run
    assert FAKE_KEY not in done.stdout + done.stderr
    for path in out.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


def test_resume_continues_the_same_run_without_repeating_steps(offline_run, tiny_bert, toy_data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(offline_run[0], out, symlinks=True)
    # as if killed after logging step 6 but before its checkpoint: resume from step 4
    shutil.rmtree(out / "checkpoints" / "step-6")
    assert (out / LAST_STEP_FILE).read_text().strip() == "6"
    train(
        tiny_bert,
        toy_data,
        out,
        "tracking.report_to=wandb",
        "tracking.wandb.mode=offline",
        "resume=auto",
    )
    first, second = (read_wandb_run(p) for p in offline_runs(out))
    assert first["run_id"] == second["run_id"] == (out / RUN_ID_FILE).read_text().strip()
    # steps 5 and 6 were retrained, but W&B already had them: nothing repeated, nothing backwards
    steps = [row["_step"] for row in first["history"] + second["history"]]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    assert all(row["_step"] > 6 for row in second["history"])
    assert "sample_predictions/path" in second["history"][-1]
    assert "final/test/accuracy" in second["summary"]


def test_mode_defaults_to_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(None) == "offline"
    assert wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled"
    assert wandb_mode("offline") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / ".netrc").write_text("machine example.com login x password y\n")
    assert wandb_mode(None) == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password z\n")
    assert wandb_mode(None) == "online"


def test_disabled_mode_writes_nothing_of_wandb(finished_tiny_run):
    """tracking.report_to=wandb with tracking.wandb.mode=disabled: no wandb/ folder, no id or step file."""
    assert read_summary(finished_tiny_run)["global_step"] == 6
    left = [n for n in ("wandb", RUN_ID_FILE, LAST_STEP_FILE) if (finished_tiny_run / n).exists()]
    assert not left, left
