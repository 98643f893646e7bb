#!/usr/bin/env bash
# One node's `accelerate launch` in a SLURM job; slurm/*.sbatch run it once per node (through srun,
# or directly on a single node) after sourcing slurm/job_env.sh, which exports what it reads.
#
#   slurm/launch_node.sh RECIPE [key=value ...]
#
# Reads ACCEL_CONFIG, NNODES, PROCS_PER_NODE, MAIN_HOST, MAIN_PORT and SLURM_NODEID (this node's
# index in the job, set by srun on each node; 0 when run directly). On several nodes the launchers
# meet through torchrun's c10d rendezvous at MAIN_HOST:MAIN_PORT, and the first node hosts it
# (is_host): on its own, every launcher whose host matches MAIN_HOST tries to host it, which fails
# when two nodes share one machine (scripts/local_slurm.sh).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 RECIPE [key=value ...]" >&2
  exit 2
fi
RECIPE=$1
shift
NODE_RANK=${SLURM_NODEID:-0}

launch=(
  accelerate launch
  --config_file "$ACCEL_CONFIG"
  --num_machines "$NNODES"
)
if ((NNODES > 1)); then
  launch+=(
    --machine_rank "$NODE_RANK"
    --num_processes "$((NNODES * PROCS_PER_NODE))"
    --main_process_ip "$MAIN_HOST"
    --main_process_port "$MAIN_PORT"
    --rdzv_backend c10d
    --rdzv_conf "is_host=$((NODE_RANK == 0 ? 1 : 0))"
  )
else
  launch+=(--num_processes "$PROCS_PER_NODE" --main_process_port "$MAIN_PORT")
fi
# The launcher and everything it starts ignore USR1, except the training processes, which install
# their own handler (checkpoint and stop): SLURM signals every process of a job step at once
# (scancel --signal, #SBATCH --signal without B:), and USR1 would kill the torchrun agent.
trap '' USR1
exec "${launch[@]}" -m scalelora.train --config "$RECIPE" "$@"
