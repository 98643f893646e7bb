"""The SLURM and launch scripts without a cluster: `bash -n`, shellcheck, the resources the scripts
derive from SLURM_*, and the GPU paths a CPU machine cannot run: fake `srun`, `scontrol` and
`accelerate` on PATH and SLURM_* set for 2 nodes with 4 GPUs each, checking the exact `accelerate
launch` command each node would run. The CPU paths, the preemption signal and the requeue run on a
real SLURM cluster in tests/test_slurm_cluster.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the scripts of this feature (other scripts in slurm/ and launch/ have their own tests)
SCRIPTS = [
    ROOT / "slurm" / "single_node.sbatch",
    ROOT / "slurm" / "multi_node.sbatch",
    ROOT / "slurm" / "preemptible.sbatch",
    ROOT / "slurm" / "sweep_array.sbatch",
    ROOT / "slurm" / "job_env.sh",
    ROOT / "slurm" / "launch_node.sh",
    ROOT / "scripts" / "local_slurm.sh",
    ROOT / "launch" / "local_multi_gpu.sh",
    ROOT / "launch" / "cpu_2proc.sh",
    ROOT / "scripts" / "gpu_check.sh",
    ROOT / "scripts" / "fetch_gpu_wheels.sh",
]

# srun: run the command once per node, in the background, with that node's SLURM_NODEID; forward TERM.
FAKE_SRUN = r"""#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_LOG/srun.calls"
while [[ $1 == -* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" &
  pids+=($!)
done
trap 'echo TERM >> "$FAKE_LOG/srun.signals"; kill -TERM "${pids[@]}" 2>/dev/null' TERM
rc=0
for pid in "${pids[@]}"; do
  while true; do
    wait "$pid"; status=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  [[ $status -gt $rc ]] && rc=$status
done
exit $rc
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu-node-17\ngpu-node-18\n'; exit 0; fi
if [[ $1 == show && $2 == node ]]; then
  printf 'NodeName=%s Arch=x86_64 CoresPerSocket=32\n   NodeAddr=10.1.0.17 NodeHostName=%s\n' "$3" "$3"; exit 0
fi
echo "scontrol $*" >> "$FAKE_LOG/scontrol.calls"
"""
# accelerate: record argv (one per line) per node; FAKE_MODE=exit:N exits N, FAKE_MODE=wait runs until TERM
# and then exits 1 like a torchrun agent whose workers were signalled.
FAKE_ACCELERATE = r"""#!/usr/bin/env bash
node=${SLURM_NODEID:-local}
printf '%s\n' "$@" > "$FAKE_LOG/accelerate.$node.args"
mode=${FAKE_MODE:-exit:0}
case $mode in
  exit:*) exit "${mode#exit:}" ;;
  wait)
    trap 'echo TERM > "$FAKE_LOG/accelerate.$node.signal"; exit 1' TERM
    touch "$FAKE_LOG/accelerate.$node.started"
    for _ in $(seq 600); do sleep 0.1; done
    exit 0 ;;
esac
"""


@pytest.fixture
def fake_cluster(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("accelerate", FAKE_ACCELERATE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(
                ("SLURM_", "SRUN_", "ACCEL_CONFIG", "GPUS_PER_NODE", "PROCS_PER_NODE", "MAIN_", "OMP_")
            )
        },
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu-node-[17-18]",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_NODEID": "0",
    }
    return env, log


def node_args(log: Path, node: int | str) -> list[str]:
    return (log / f"accelerate.{node}.args").read_text().splitlines()


def expected_node_command(config: str, node: int, port: str, tail: list[str]) -> list[str]:
    return [
        "launch",
        "--config_file",
        config,
        "--num_machines",
        "2",
        "--machine_rank",
        str(node),
        "--num_processes",
        "8",
        "--main_process_ip",
        "10.1.0.17",  # the first node's NodeAddr
        "--main_process_port",
        port,
        "--rdzv_backend",
        "c10d",
        "--rdzv_conf",
        f"is_host={int(node == 0)}",  # the first node hosts the rendezvous
        "-m",
        "scalelora.train",
        "--config",
        "emotion",
        *tail,
    ]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_passes_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    # from the repository root, where `source slurm/job_env.sh` resolves
    result = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_executable_and_documented(script):
    text = script.read_text()
    assert os.access(script, os.X_OK)
    assert text.startswith("#!/usr/bin/env bash\n#")
    if script.suffix == ".sbatch":
        sbatch_lines = [line for line in text.splitlines() if line.startswith("#SBATCH")]
        assert sbatch_lines and all("#" in line[len("#SBATCH") :] for line in sbatch_lines), (
            "document every #SBATCH line"
        )
        # a log per job id (per array task)
        assert "#SBATCH --output=%x-%j.log" in text or "#SBATCH --output=%x-%A_%a.log" in text
        # resources come from the sbatch command line: a CPU-only cluster rejects GPU requests
        assert not re.search(r"^#SBATCH\s+--(gpus|gres|cpus-per|mem|partition)", text, re.M)


def run_bash(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`bash ARGS` from the repository root, as a job script runs there (output captured, 60 s at most)."""
    return subprocess.run(["bash", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_multi_node_on_gpu_nodes_runs_one_launch_per_node_with_its_own_rank(fake_cluster):
    env, log = fake_cluster
    result = run_bash(
        "slurm/multi_node.sbatch", "emotion", "lora.r=16", "tracking.wandb.name=two words", env=env
    )
    assert result.returncode == 0, result.stderr
    port = node_args(log, 0)[node_args(log, 0).index("--main_process_port") + 1]
    assert port.isdigit() and 1024 <= int(port) <= 65535
    # never from the kernel's ephemeral range, where srun's own sockets on this node can take it again
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert 10000 <= int(port) < low
    for node in (0, 1):
        assert node_args(log, node) == expected_node_command(
            "accel_configs/deepspeed_zero3_multinode.yaml",
            node,
            port,
            ["lora.r=16", "tracking.wandb.name=two words"],
        )
    srun = (log / "srun.calls").read_text()
    assert "--nodes=2" in srun and "--ntasks-per-node=1" in srun


def test_multi_node_takes_the_accel_config_and_gpu_count_from_the_environment(fake_cluster):
    env, log = fake_cluster
    env = {
        **env,
        "ACCEL_CONFIG": "accel_configs/deepspeed_zero2.yaml",
        "GPUS_PER_NODE": "2",
        "MAIN_PORT": "29555",
    }
    result = run_bash("slurm/multi_node.sbatch", "emotion", env=env)
    assert result.returncode == 0, result.stderr
    args = node_args(log, 1)
    assert args[args.index("--config_file") + 1] == "accel_configs/deepspeed_zero2.yaml"
    assert args[args.index("--num_processes") + 1] == "4"
    assert args[args.index("--main_process_port") + 1] == "29555"
    assert args[args.index("--machine_rank") + 1] == "1"


def test_single_node_on_a_gpu_node_launches_every_gpu(fake_cluster):
    env, log = fake_cluster
    env = {**env, "SLURM_NNODES": "1", "SLURM_NODEID": "0", "MAIN_PORT": "29500"}
    result = run_bash("slurm/single_node.sbatch", "emotion", "train.lr=1e-4", env=env)
    assert result.returncode == 0, result.stderr
    assert node_args(log, 0) == [
        "launch",
        "--config_file",
        "accel_configs/multi_gpu.yaml",
        "--num_machines",
        "1",
        "--num_processes",
        "4",
        "--main_process_port",
        "29500",
        "-m",
        "scalelora.train",
        "--config",
        "emotion",
        "train.lr=1e-4",
    ]


@pytest.mark.parametrize(
    "script", ["slurm/single_node.sbatch", "slurm/multi_node.sbatch", "slurm/preemptible.sbatch"]
)
def test_sbatch_without_a_recipe_prints_usage(fake_cluster, script):
    env, _ = fake_cluster
    result = run_bash(script, env=env)
    assert result.returncode == 2 and "usage:" in result.stderr


@pytest.mark.parametrize(("launcher_exit", "script_exit", "requeued"), [(1, 1, False), (75, 0, True)])
def test_preemptible_requeues_only_after_a_preemption_exit(
    fake_cluster, launcher_exit, script_exit, requeued
):
    env, log = fake_cluster
    env = {**env, "FAKE_MODE": f"exit:{launcher_exit}", "MAIN_PORT": "29501"}
    result = run_bash("slurm/preemptible.sbatch", "emotion", "output_dir=/shared/runs/emo", env=env)
    assert result.returncode == script_exit, result.stdout + result.stderr
    assert (
        (log / "scontrol.calls").is_file() and "requeue 4242" in (log / "scontrol.calls").read_text()
    ) is requeued
    for node in (0, 1):
        args = node_args(log, node)
        assert args[-3:] == ["emotion", "output_dir=/shared/runs/emo", "resume=auto"]
        assert args[args.index("--machine_rank") + 1] == str(node)


JOB_ENV_CASES = {
    # name: (environment, expected GPUS_PER_NODE, PROCS_PER_NODE, ACCEL_CONFIG, OMP_NUM_THREADS)
    "gpus_on_node": (
        {"SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "32"},
        ("8", "8", "accel_configs/multi_gpu.yaml", "4"),
    ),
    "typed_gpus_per_node": (
        {"SLURM_GPUS_PER_NODE": "a100:4", "SLURM_CPUS_ON_NODE": "16"},
        ("4", "4", "accel_configs/multi_gpu.yaml", "4"),
    ),
    "cuda_visible_devices": (
        {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_CPUS_PER_TASK": "1"},
        ("2", "2", "accel_configs/multi_gpu.yaml", "1"),
    ),
    "cpu_node": ({"SLURM_CPUS_PER_TASK": "8"}, ("0", "1", "accel_configs/cpu_2proc.yaml", "8")),
    "cpu_node_2_procs": (
        {"SLURM_CPUS_PER_TASK": "8", "PROCS_PER_NODE": "2"},
        ("0", "2", "accel_configs/cpu_2proc.yaml", "4"),
    ),
    "user_settings_win": (
        {"SLURM_GPUS_ON_NODE": "8", "GPUS_PER_NODE": "2", "ACCEL_CONFIG": "x.yaml", "OMP_NUM_THREADS": "3"},
        ("2", "2", "x.yaml", "3"),
    ),
}


@pytest.mark.parametrize("case", JOB_ENV_CASES)
def test_job_env_derives_the_launch_from_the_resources_slurm_gave(fake_cluster, case):
    env, _ = fake_cluster
    extra, expected = JOB_ENV_CASES[case]
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_GPUS") and k != "CUDA_VISIBLE_DEVICES"}
    env.update(SLURM_NNODES="1", **extra)
    result = run_bash(
        "-c",
        "set -eu; source slurm/job_env.sh; "
        'echo "$GPUS_PER_NODE $PROCS_PER_NODE $ACCEL_CONFIG $OMP_NUM_THREADS ${SRUN_CPUS_PER_TASK:-unset}"',
        env=env,
    )
    assert result.returncode == 0, result.stderr
    *launch, srun_cpus = result.stdout.split()
    assert tuple(launch) == expected
    # srun does not inherit --cpus-per-task from sbatch (SLURM 22.05+): the scripts pass it on
    assert srun_cpus == extra.get("SLURM_CPUS_PER_TASK", "unset")


def test_local_launchers_pass_the_recipe_and_overrides(fake_cluster):
    env, log = fake_cluster
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    env.update(MAIN_PORT="29503", NUM_GPUS="3")
    result = run_bash("launch/local_multi_gpu.sh", "emotion", "lora.r=4", env=env)
    assert result.returncode == 0, result.stderr
    assert node_args(log, "local") == [
        "launch",
        "--config_file",
        "accel_configs/multi_gpu.yaml",
        "--num_machines",
        "1",
        "--num_processes",
        "3",
        "--main_process_port",
        "29503",
        "-m",
        "scalelora.train",
        "--config",
        "emotion",
        "lora.r=4",
    ]
    env["ACCEL_CONFIG"] = "accel_configs/deepspeed_zero3.yaml"
    result = run_bash("launch/cpu_2proc.sh", "quickstart", env=env)
    assert result.returncode == 0, result.stderr
    args = node_args(log, "local")
    assert args[args.index("--config_file") + 1] == "accel_configs/deepspeed_zero3.yaml"
    assert args[args.index("--num_processes") + 1] == "2"
    assert "--cpu" not in args  # --cpu silently switches DeepSpeed off


def job_env_exports(env: dict[str, str]) -> dict[str, str]:
    """The environment `source slurm/job_env.sh` leaves, run from the repository root under `set -eu`."""
    result = run_bash("-c", "set -eu; source slurm/job_env.sh; env", env=env)
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, "{home}/.config/scalelora/checkpoint.key"),
        ({"XDG_CONFIG_HOME": "/etc/me"}, "/etc/me/scalelora/checkpoint.key"),
        ({"SCALELORA_KEY_FILE": "/shared/me/checkpoint.key"}, "/shared/me/checkpoint.key"),
    ],
)
def test_job_env_exports_one_checkpoint_key_path_for_every_node(fake_cluster, tmp_path, given, expected):
    """srun hands the batch shell's environment to every node: the key path is resolved once, here, so
    every node signs and verifies with the same file (a shared one, when SCALELORA_KEY_FILE names it)."""
    env, _ = fake_cluster
    env = {k: v for k, v in env.items() if k not in ("SCALELORA_KEY_FILE", "XDG_CONFIG_HOME")}
    env.update(HOME=str(tmp_path), SLURM_NNODES="1", **given)
    assert job_env_exports(env)["SCALELORA_KEY_FILE"] == expected.format(home=tmp_path)


def test_the_sweep_array_exports_the_checkpoint_key_path(fake_cluster, tmp_path):
    """A requeued array task may resume on another node: the sweep script exports the key path too."""
    text = (ROOT / "slurm" / "sweep_array.sbatch").read_text()
    line = next(x for x in text.splitlines() if x.startswith("export SCALELORA_KEY_FILE="))
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("SCALELORA_KEY_FILE", None)
    env.pop("XDG_CONFIG_HOME", None)
    result = subprocess.run(
        ["bash", "-c", f"{line}; echo $SCALELORA_KEY_FILE"], env=env, capture_output=True, text=True
    )
    assert result.stdout.strip() == f"{tmp_path}/.config/scalelora/checkpoint.key"


def test_the_rendezvous_port_comes_from_the_job_id_below_the_ephemeral_range():
    """job_env.sh's MAIN_PORT: 10000 + the job id (modulo the span below the ephemeral range), the next free
    port when that one is taken; a port from bind(0) could be taken again by srun before the launcher binds it."""
    import socket

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    span = low - 10000

    def main_port(job_id: int) -> int:
        env = {k: v for k, v in os.environ.items() if k != "MAIN_PORT"}
        env.update(SLURM_JOB_ID=str(job_id), SLURM_NNODES="1")
        return int(job_env_exports(env)["MAIN_PORT"])

    job = 7 * span + 1234
    with socket.socket() as held:
        try:
            held.bind(("", 10000 + 1234))
        except OSError:
            pytest.skip("port 11234 is in use here")
        held.listen()
        assert main_port(job) == 10000 + 1235  # the job's own port is taken: the next free one
    assert main_port(job) == 10000 + 1234
    assert main_port(span - 1) == 10000 + span - 1 < low
