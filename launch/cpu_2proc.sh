#!/usr/bin/env bash
# The multi-process dev run: 2 CPU processes on gloo, same arguments as a GPU run.
#
#   launch/cpu_2proc.sh RECIPE [key=value ...]
#   ACCEL_CONFIG=accel_configs/deepspeed_zero3.yaml launch/cpu_2proc.sh quickstart train.max_steps=20
#
# ACCEL_CONFIG defaults to accel_configs/cpu_2proc.yaml (DDP). The DeepSpeed configs run on CPU too
# (2 processes, gloo); the first DeepSpeed run compiles its shared-memory op (~1 min) and, with
# offload, cpu_adam (~1.5 min) into TORCH_EXTENSIONS_DIR (default here: .cache/torch_extensions).
# Never add --cpu to a DeepSpeed launch: Accelerate then silently drops DeepSpeed.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 RECIPE [key=value ...]" >&2
  exit 2
fi
RECIPE=$1
shift

ACCEL_CONFIG=${ACCEL_CONFIG:-accel_configs/cpu_2proc.yaml}
MAIN_PORT=${MAIN_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}

exec accelerate launch \
  --config_file "$ACCEL_CONFIG" \
  --num_machines 1 \
  --num_processes 2 \
  --main_process_port "$MAIN_PORT" \
  -m scalelora.train --config "$RECIPE" "$@"
