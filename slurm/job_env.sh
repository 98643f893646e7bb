#!/usr/bin/env bash
# Sourced by slurm/*.sbatch, not run: turns what SLURM gave the job into the launch settings.
# Resources come from the sbatch command line only (the scripts request no GPUs or CPU counts):
#
#   sbatch --gpus-per-node=8 --cpus-per-task=32 slurm/single_node.sbatch emotion   # a GPU node
#   sbatch slurm/single_node.sbatch quickstart                                      # a CPU node
#
# Reads, all optional: GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE, else
# the devices in CUDA_VISIBLE_DEVICES, else 0), PROCS_PER_NODE (training processes per node;
# default: one per GPU, 1 without GPUs), ACCEL_CONFIG (default: $GPU_ACCEL_CONFIG, set by the
# calling script, with GPUs; accel_configs/cpu_2proc.yaml, DDP on gloo, without), OMP_NUM_THREADS
# (default: the CPUs per task, SLURM_CPUS_PER_TASK, else the CPUs of this node, SLURM_CPUS_ON_NODE,
# divided by PROCS_PER_NODE, at least 1), MAIN_PORT (default: a free port on this, the first, node).
# Exports those, NNODES and MAIN_HOST (the first node's NodeAddr), and SRUN_CPUS_PER_TASK so the
# `srun` job step keeps the job's --cpus-per-task (srun does not inherit it since SLURM 22.05), and
# SCALELORA_KEY_FILE (the checkpoint key every node signs and verifies with).

# GPUs SLURM gave this node: "4", or "a100:4" in SLURM_GPUS_PER_NODE
slurm_gpus_on_node() {
  local count=${SLURM_GPUS_ON_NODE:-}
  if [[ -z $count && -n ${SLURM_GPUS_PER_NODE:-} ]]; then
    count=${SLURM_GPUS_PER_NODE##*:}
  fi
  if [[ -z $count && -n ${CUDA_VISIBLE_DEVICES:-} && $CUDA_VISIBLE_DEVICES != NoDevFiles ]]; then
    local ids
    IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    count=${#ids[@]}
  fi
  echo "${count:-0}"
}

# The address the other nodes reach the first node at: its NodeAddr (which defaults to its name).
slurm_first_node_addr() {
  local first addr
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p) # sed reads all: no SIGPIPE
  addr=$(scontrol show node "$first" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | sed -n 1p)
  echo "${addr:-$first}"
}

export NNODES=${SLURM_NNODES:?not inside a SLURM allocation (SLURM_NNODES is unset)}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(slurm_gpus_on_node)}
export GPUS_PER_NODE
if ((GPUS_PER_NODE > 0)); then
  export PROCS_PER_NODE=${PROCS_PER_NODE:-$GPUS_PER_NODE}
  export ACCEL_CONFIG=${ACCEL_CONFIG:-${GPU_ACCEL_CONFIG:-accel_configs/multi_gpu.yaml}}
else
  export PROCS_PER_NODE=${PROCS_PER_NODE:-1}
  export ACCEL_CONFIG=${ACCEL_CONFIG:-accel_configs/cpu_2proc.yaml}
fi
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
  OMP_NUM_THREADS=$((${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}} / PROCS_PER_NODE))
  ((OMP_NUM_THREADS >= 1)) || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
  export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi
if ((NNODES > 1)); then
  MAIN_HOST=$(slurm_first_node_addr)
else
  MAIN_HOST=127.0.0.1
fi
export MAIN_HOST
# The checkpoint key (scalelora.signing) signs every checkpoint and is needed to resume one on any node.
# Exported as the path this, the first, node resolves, so srun hands every node the same path; on nodes
# without a shared home, set SCALELORA_KEY_FILE before sbatch to a file on a shared filesystem.
export SCALELORA_KEY_FILE=${SCALELORA_KEY_FILE:-${XDG_CONFIG_HOME:-$HOME/.config}/scalelora/checkpoint.key}
# The batch script runs on the first node of the allocation, so a port free here is free on MAIN_HOST. It is
# taken below the kernel's ephemeral range (from 10000 + the job id, the first free one): a port the kernel
# hands out for port 0 comes from that range, and srun's own sockets on this node can take it again before
# the launcher binds it (seen: the rendezvous port held by srun, the job failed).
export MAIN_PORT=${MAIN_PORT:-$(python -c '
import os, socket
try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except (OSError, ValueError, IndexError):
    low = 32768
span = max(low - 10000, 1)
start = int(os.environ.get("SLURM_JOB_ID", "0")) % span
for offset in range(span):
    port = 10000 + (start + offset) % span
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            continue
    print(port)
    break
')}
