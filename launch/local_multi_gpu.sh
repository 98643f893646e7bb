#!/usr/bin/env bash
# All GPUs of this machine, one process each (the local equivalent of slurm/single_node.sbatch).
#
#   launch/local_multi_gpu.sh RECIPE [key=value ...]
#   ACCEL_CONFIG=accel_configs/deepspeed_zero3.yaml NUM_GPUS=4 launch/local_multi_gpu.sh emotion lora.r=16
#
# Environment: ACCEL_CONFIG (default accel_configs/multi_gpu.yaml), NUM_GPUS (default: every GPU
# nvidia-smi lists), MAIN_PORT (default: a free port). Run it from the repository root.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 RECIPE [key=value ...]" >&2
  exit 2
fi
RECIPE=$1
shift

ACCEL_CONFIG=${ACCEL_CONFIG:-accel_configs/multi_gpu.yaml}
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
if [[ $NUM_GPUS -lt 1 ]]; then
  echo "$0: no GPU found (nvidia-smi lists none); on CPU use launch/cpu_2proc.sh" >&2
  exit 2
fi
MAIN_PORT=${MAIN_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec accelerate launch \
  --config_file "$ACCEL_CONFIG" \
  --num_machines 1 \
  --num_processes "$NUM_GPUS" \
  --main_process_port "$MAIN_PORT" \
  -m scalelora.train --config "$RECIPE" "$@"
