"""scripts/gpu_check.sh without a GPU: its dry run (every case's config resolved with scalelora's own loader,
its command built, the carry size checked), the size of what a lent GPU machine takes (repository + carried
wheels, model and data, from the committed manifest), the reload check, the refusal to run on a CUDA-less
torch, the time budget, and (slow) the driver end to end on the CPU with a tiny model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import gpu_cases  # noqa: E402
import gpu_check  # noqa: E402

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
MIB = 2**20


def run_script(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, env=full, timeout=timeout, cwd=ROOT
    )


def context(tmp_path: Path, **extra) -> gpu_check.Context:
    values = dict(
        work=tmp_path / "work",
        out=tmp_path / "out",
        carry=tmp_path / "carry",
        python=sys.executable,
        steps=4,
        num_gpus=1,
        budget=300,
        started=time.time(),
    )
    values.update(extra)
    return gpu_check.Context(**values)


def test_dry_run_resolves_every_case_and_checks_the_carry():
    done = run_script("--dry-run", env={"CARRY_DIR": "/nonexistent-carry"}, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    listed = {line.split(":", 1)[0] for line in done.stdout.splitlines() if ": " in line}
    assert {case.name for case in gpu_cases.CASES} <= listed
    assert f"dry run ok: {len(gpu_cases.CASES)} cases resolved" in done.stdout
    assert re.search(r"gpu_check: carry [\d.]+ MiB of 60", done.stdout)
    # $PYTHON runs everything, the launcher too (Python's own module, never an `accelerate` script on PATH)
    assert f"bf16: {sys.executable} -m scalelora.train --config quickstart" in done.stdout
    assert f"zero3: {sys.executable} -m accelerate.commands.launch --config_file" in done.stdout
    assert " accelerate launch " not in done.stdout


def test_dry_run_fails_on_a_config_key_that_no_longer_exists(tmp_path, capsys):
    stale = gpu_cases.Case("stale", "a key renamed since", overrides=("train.mixed_precision=bf16",))
    assert gpu_check.dry_run(context(tmp_path), [stale]) == 1
    assert "unknown config key 'train.mixed_precision'" in capsys.readouterr().err


def test_the_case_table():
    names = [case.name for case in gpu_cases.CASES]
    assert names[:2] == ["bf16", "zero3"], "the most valuable cases run first"
    assert {"compile", "kd_zero3", "grad_ckpt", "zero2_fp16", "predict_export", "minilm_bf16"} <= set(names)
    assert gpu_check.table_problems() == []
    bad = gpu_cases.Case("x", "y", checks=("relaod",), needs="later")
    gpu_cases.CASES.append(bad)
    try:
        assert len(gpu_check.table_problems()) == 2
    finally:
        gpu_cases.CASES.remove(bad)


def test_zero3_configs_partition_even_lora_tensors(tmp_path):
    import yaml

    configs = gpu_check.deepspeed_configs(tmp_path)
    for launch, path in configs.items():
        accel = yaml.safe_load(path.read_text())
        ds = json.loads(Path(accel["deepspeed_config"]["deepspeed_config_file"]).read_text())
        zero = ds["zero_optimization"]
        if launch.startswith("zero3"):
            assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0
        else:
            assert zero["stage"] == 2


def test_repository_and_carry_fit_a_lent_gpu_machine():
    """Repository (as it travels: tracked + untracked-not-ignored files) + the carried wheels, model and data
    of the committed manifest <= 60 MiB (a lent machine takes 64 in all). Over it: carry less
    (MODEL=0 scripts/fetch_gpu_wheels.sh drops the real-model cases' 46 MiB) or shrink the repository."""
    manifest = json.loads(gpu_check.MANIFEST.read_text())
    repo, _ = gpu_check.repo_bytes()
    wheels = sum(w["bytes"] for w in manifest["wheels"])
    model = (manifest["model"] or {}).get("bytes", 0) + (manifest["data"] or {}).get("bytes", 0)
    total = repo + wheels + model
    assert total <= 60 * MIB, (
        f"repository {repo / MIB:.1f} + wheels {wheels / MIB:.1f} + model and data {model / MIB:.1f} MiB > 60"
    )
    assert gpu_check.carry_budget()["ok"]


def test_the_carry_holds_only_what_the_gpu_image_lacks():
    image = {
        line.strip().lower()
        for line in (ROOT / "scripts" / "gpu_image_packages.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    manifest = json.loads(gpu_check.MANIFEST.read_text())
    carried = {w["name"] for w in manifest["wheels"]}
    assert {"deepspeed", "bitsandbytes", "datasets", "pydantic"} <= carried
    assert not carried & image, f"carried although the image has them: {carried & image}"
    bnb = next(w for w in manifest["wheels"] if w["name"] == "bitsandbytes")
    assert bnb["bytes"] < 8 * MIB, "bitsandbytes is carried with only the image's CUDA library"


def test_reload_check_applies_the_runs_calibration(finished_tiny_run, tiny_bert, tmp_path):
    """The run's sample predictions are temperature-scaled; the reload reproduces them, and an adapter
    whose trained head was saved wrong (negated) does not."""
    import shutil

    from safetensors.torch import load_file, save_file

    calibration = json.loads((finished_tiny_run / "adapter" / "calibration.json").read_text())
    assert abs(calibration["temperature"] - 1) > 0.5  # else the check could not tell the two apart
    assert gpu_check.reload_matches(finished_tiny_run, tiny_bert) <= 1e-3
    broken = tmp_path / "run"
    shutil.copytree(finished_tiny_run, broken)
    weights = broken / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: -v if "classifier" in k else v for k, v in tensors.items()}, str(weights))
    with pytest.raises(gpu_check.CheckFailed):
        gpu_check.reload_matches(broken, tiny_bert)


def test_a_cuda_less_torch_fails_the_check(tmp_path):
    """Exit code 2 and a report saying so, before anything is built or run (the budget of 1 s would
    otherwise end the run as `incomplete`, exit code 1)."""
    done = run_script(
        "--only", "bf16", "--budget", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
        env={"CARRY_DIR": str(tmp_path / "no-carry")}, timeout=240,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "sees no CUDA device" in done.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["status"] == "no_cuda" and "cases" not in report
    assert not (tmp_path / "work" / "model").exists()


def test_cases_that_do_not_fit_the_budget_are_reported_with_their_rerun_line(tmp_path, capsys):
    ctx = context(tmp_path, budget=0)
    report: dict = {}
    cases = gpu_cases.select(["zero3", "fp16"])
    assert gpu_check.run_all(ctx, cases, report) == 1
    assert report["status"] == "incomplete"
    assert [c["result"] for c in report["cases"]] == ["not_run", "not_run"]
    assert report["rerun"] == "scripts/gpu_check.sh --only zero3,fp16"
    printed = capsys.readouterr().out
    assert "| zero3 | not_run |" in printed and "| fp16 | not_run |" in printed
    assert json.loads((ctx.out / "gpu_check.json").read_text())["status"] == "incomplete"
    assert (ctx.out / "gpu_check_logs.tar.gz").is_file()


def test_a_failed_case_is_noted_with_the_workers_exception_not_torchruns_summary(tmp_path):
    log = tmp_path / "case.log"
    log.write_text(
        "[rank0]:   File \"x.py\", line 1, in f\n[rank0]: RuntimeError: 'weight' must be 2-D\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
        "  error_file: <N/A>\n  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html\n"
    )
    assert gpu_check.last_error(log) == "RuntimeError: 'weight' must be 2-D"


def test_a_rerun_puts_in_the_run_a_case_starts_from(tmp_path):
    ctx = context(tmp_path)
    chosen = gpu_cases.select(["zero3_resume", "predict_export"])
    assert [c.name for c in gpu_check.plan(ctx, chosen)] == [
        "bf16",
        "zero3",
        "zero3_resume",
        "predict_export",
    ]
    (ctx.run_dir("zero3")).mkdir(parents=True)
    (ctx.run_dir("zero3") / "summary.json").write_text("{}")
    assert [c.name for c in gpu_check.plan(ctx, chosen)] == ["bf16", "zero3_resume", "predict_export"]


def test_verified_on_quotes_only_a_committed_gpu_report():
    """docs/scale-out.md's "Verified on" table claims a GPU result only where results/gpu_check.json (a
    committed report of scripts/gpu_check.sh on a GPU) has that case passing, named in the cell."""
    page = (ROOT / "docs" / "scale-out.md").read_text()
    table = page.split("## Verified on", 1)[1].split("\n## ", 1)[0]
    committed = ROOT / "results" / "gpu_check.json"
    report = json.loads(committed.read_text()) if committed.is_file() else None
    passed = {c["name"] for c in (report or {}).get("cases", []) if c["result"] == "ok"}
    if report is not None:
        assert report["mode"] == "gpu"
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("path", "---"):
            continue
        gpu = cells[2]
        if "verified" in gpu.lower() or "ok" in gpu.lower().split():
            named = set(re.findall(r"`([\w]+)`", gpu))
            assert report is not None, (
                f"{cells[0]}: GPU cell says verified, but no results/gpu_check.json is committed"
            )
            assert named and named <= passed, (
                f"{cells[0]}: cases {named - passed} did not pass in results/gpu_check.json"
            )


def test_the_docs_list_the_cases_in_their_order():
    page = " ".join((ROOT / "docs" / "scale-out.md").read_text().split())
    assert ", ".join(f"`{case.name}`" for case in gpu_cases.CASES) + "." in page


@pytest.mark.slow
def test_the_driver_end_to_end_on_the_cpu(tmp_path):
    """`--cpu-smoke` (tiny model, no CUDA required, marked as such in the report): a rerun of predict_export
    alone first runs bf16, which it works on; each row is printed as it finishes; the JSON report and the
    archive of logs are written."""
    done = run_script(
        "--cpu-smoke", "--only", "predict_export", "--steps", "4", "--work", str(tmp_path / "work"),
        "--out", str(tmp_path / "out"), env={"CARRY_DIR": str(tmp_path / "no-carry")}, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [
        line
        for line in done.stdout.splitlines()
        if line.startswith("| bf16 ") or line.startswith("| predict_export ")
    ]
    assert [row.split("|")[2].strip() for row in rows] == ["ok", "ok"]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["status"] == "passed"
    bf16 = report["cases"][0]
    assert bf16["samples_per_s"] == bf16["extra"]["steady_state"]["samples_per_second"]
    assert report["packages"]["torch"] and report["packages"]["transformers"]
    with tarfile.open(tmp_path / "out" / "gpu_check_logs.tar.gz") as archive:
        names = archive.getnames()
    assert "gpu_check_logs/logs/bf16.log" in names and "gpu_check_logs/runs/bf16/summary.json" in names
