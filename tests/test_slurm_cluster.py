"""The sbatch scripts on a real SLURM cluster: `scripts/local_slurm.sh up` starts munged, slurmctld and
two slurmd (nodes n1 and n2, 1 CPU each) on this machine; the tests submit the project's scripts with
`sbatch` and wait on the scheduler. Run as root (or with SLURM installed): `make install` installs
slurm-wlm and munge when they are missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, accelerate_launch, read_summary, run_cli, tiny_overrides
from scalelora.checkpoint import checkpoint_dirs
from scalelora.tracking import RUN_ID_FILE

pytestmark = pytest.mark.slow

LOCAL_SLURM = ROOT / "scripts" / "local_slurm.sh"
DONE_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
# long enough that a signal lands mid-training; one evaluation; the final weights are the adapter
RUN = {
    "train.max_steps": 200,
    "eval.every": 200,
    "eval.load_best_at_end": "false",
    "eval.sample_predictions": 2,
    "lora.dropout": 0.0,
}


class Cluster:
    def __init__(self, conf: Path, logs: Path) -> None:
        self.conf = conf
        self.logs = logs
        # what a user's shell would pass on (sbatch exports it): this checkout's code, the data,
        # and no SLURM_* of an outer job; OMP_NUM_THREADS is left to the scripts
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
            and k not in ("OMP_NUM_THREADS", "PROCS_PER_NODE", "GPUS_PER_NODE", "ACCEL_CONFIG", "MAIN_PORT")
        }
        self.env.update(
            SLURM_CONF=str(conf),
            PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            ),
            CUDA_VISIBLE_DEVICES="",  # a CPU cluster, whatever this machine has
        )

    def run(self, *command: str, env: dict | None = None) -> str:
        done = subprocess.run(
            command, cwd=ROOT, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"{' '.join(command)}: {done.stdout}{done.stderr}"
        return done.stdout

    def sbatch(self, script: str, *args: str, options: tuple[str, ...] = (), env: dict | None = None) -> str:
        """Submit slurm/<script> from the repository root, as the README says; returns the job id."""
        out = self.run(
            "sbatch", "--parsable", f"--output={self.logs}/%x-%j.log", *options, script, *args, env=env
        )
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "--oneliner", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text.splitlines()[0]))

    def wait(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in DONE_STATES:
                return info
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], env=self.env, check=False)
                raise AssertionError(
                    f"job {job_id} still {info['JobState']} after {timeout}s:\n{self.log(job_id)}"
                )
            time.sleep(0.5)

    def wait_for_empty_queue(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.run("squeue", "--noheader", "--format=%i %T").strip():
            assert time.monotonic() < deadline, self.run("squeue")
            time.sleep(0.5)

    def log(self, job_id: str) -> str:
        found = list(self.logs.glob(f"*-{job_id}.log"))
        return found[0].read_text() if found else f"(no log for job {job_id} in {self.logs})"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Cluster:
    if shutil.which("sbatch") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        # scripts/local_slurm.sh up installs it otherwise
        pytest.skip(
            "SLURM is not installed and cannot be here (needs root and apt-get): see docs/slurm-local.md"
        )
    # its own state directory (not under pytest's 0700 tmp: munged wants its socket's folders searchable)
    state = Path(tempfile.mkdtemp(prefix="scalelora-slurm-test-"))
    env = {**os.environ, "SCALELORA_SLURM_DIR": str(state)}
    up = subprocess.run([str(LOCAL_SLURM), "up"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield Cluster(state / "slurm.conf", tmp_path_factory.mktemp("slurm-logs"))
    finally:
        subprocess.run([str(LOCAL_SLURM), "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    first, second = adapter(a), adapter(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def local_two_process_run(tiny_bert, toy_data, tmp_path_factory) -> Path:
    """The reference: the same run with 2 processes of one `accelerate launch` on this machine."""
    out = tmp_path_factory.mktemp("local") / "run"
    result = run_cli(
        "scalelora.train",
        ["--config", "quickstart", *tiny_overrides(tiny_bert, toy_data, out, **RUN)],
        launcher=accelerate_launch(2, "cpu_2proc.yaml"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_local_cluster_runs_one_task_on_each_node(slurm):
    out = slurm.run(
        "srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c", 'echo "$SLURMD_NODENAME $SLURM_NODEID"'
    )
    assert sorted(out.split("\n")[:2]) == ["n1 0", "n2 1"]


def test_single_node_sbatch_runs_two_processes_on_one_node(slurm, tiny_bert, toy_data, tmp_path):
    out = tmp_path / "run"
    job = slurm.sbatch(
        "slurm/single_node.sbatch",
        "quickstart",
        *tiny_overrides(tiny_bert, toy_data, out),
        env={"PROCS_PER_NODE": "2"},
    )
    info = slurm.wait(job)
    log = slurm.log(job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert info["NodeList"] in ("n1", "n2")
    # no GPU: the CPU config, OMP threads = 1 CPU per task / 2 processes, at least 1
    assert "2 process(es), 0 GPU(s), OMP_NUM_THREADS=1, accel_configs/cpu_2proc.yaml" in log
    assert read_summary(out)["world_size"] == 2


def test_multi_node_sbatch_matches_a_local_two_process_run(
    slurm, tiny_bert, toy_data, tmp_path, local_two_process_run
):
    out = tmp_path / "run"
    job = slurm.sbatch(
        "slurm/multi_node.sbatch", "quickstart", *tiny_overrides(tiny_bert, toy_data, out, **RUN)
    )
    info = slurm.wait(job)
    log = slurm.log(job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2"
    # the rendezvous address is the first node's NodeAddr, not its name (n1 does not resolve)
    assert "on 2 nodes x 1 process(es)" in log and "rendezvous 127.0.0.1:" in log
    summary, reference = read_summary(out), read_summary(local_two_process_run)
    assert summary["world_size"] == 2 and summary["global_step"] == RUN["train.max_steps"]
    for split in ("validation", "test"):
        mine, theirs = summary["eval"][split], reference["eval"][split]
        assert mine["confusion_matrix"] == theirs["confusion_matrix"]
        for metric in ("accuracy", "macro_f1", "ece"):
            assert mine[metric] == pytest.approx(theirs[metric], abs=1e-6)
    assert_same_adapter(local_two_process_run, out)


def test_preemptible_sbatch_checkpoints_requeues_and_resumes(
    slurm, tiny_bert, toy_data, tmp_path, local_two_process_run
):
    out = tmp_path / "run"
    wandb = ["tracking.report_to=wandb", "tracking.wandb.mode=offline"]
    job = slurm.sbatch(
        "slurm/preemptible.sbatch",
        "quickstart",
        *tiny_overrides(tiny_bert, toy_data, out, **RUN),
        *wandb,
        options=("--nodes=2",),
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    # the first train log line (step 2) means both ranks train, with their signal handlers installed
    while not (metrics.is_file() and '"split": "train"' in metrics.read_text()):
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), slurm.log(job)[-4000:]
        assert time.monotonic() < deadline, "training did not start in time"
        time.sleep(0.2)
    # what `#SBATCH --signal=B:USR1@120` does 120 s before the time limit
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    info = slurm.wait(job)
    log = slurm.log(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    assert "attempt 1 on 2 node(s)" in log and "attempt 2 on 2 node(s)" in log and "got USR1" in log
    stops = re.findall(r"stopped by SIGUSR1; checkpoint (\S+);", log)
    assert len(stops) == 2 and stops[0] == stops[1], log[-4000:]  # both ranks, the same step
    step = int(stops[0].rsplit("-", 1)[1])
    assert 0 < step < RUN["train.max_steps"]
    assert f"resumed from {stops[0]} at step {step}" in log
    assert read_summary(out)["global_step"] == RUN["train.max_steps"]
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")][-1] == f"step-{RUN['train.max_steps']}"
    assert_same_adapter(local_two_process_run, out)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == RUN["train.max_steps"]
    # one W&B run across both attempts: one offline folder per attempt, all with the kept id
    run_id = (out / RUN_ID_FILE).read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and {p.name for p in runs} == {f"run-{run_id}.wandb"}


def test_sweep_slurm_runs_a_job_array_and_writes_the_table(slurm, tiny_bert, toy_data, tmp_path):
    out = tmp_path / "sweep"
    fixed = tiny_overrides(tiny_bert, toy_data, tmp_path / "unused")
    fixed = [o for o in fixed if not o.startswith("output_dir=")]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "scalelora.sweep",
            "--config",
            "quickstart",
            "--grid",
            "lora.r=2,4",
            "--out",
            str(out),
            "--slurm",
            *fixed,
        ],
        cwd=ROOT,
        env=slurm.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    array_id = re.search(r"array job (\d+)", done.stdout).group(1)
    slurm.wait_for_empty_queue()
    tasks = [slurm.job(f"{array_id}_{task}") for task in (0, 1)]
    assert [t["JobState"] for t in tasks] == ["COMPLETED", "COMPLETED"], tasks
    table = (out / "sweep.md").read_text()
    assert re.search(r"^\| \**2\** \|", table, re.M) and re.search(r"^\| \**4\** \|", table, re.M), table
    assert all((out / name / "summary.json").is_file() for name in ("r2", "r4"))
