#!/usr/bin/env bash
# The GPU half of the scale-out checks, in one command on a machine with an NVIDIA GPU:
#
#   scripts/gpu_check.sh                        # every case that fits the time budget, most important first
#   scripts/gpu_check.sh --only zero3,4bit      # a subset, e.g. the rerun line the report ends with
#   scripts/gpu_check.sh --dry-run              # any machine, no GPU: resolve every case, check the carry size
#   scripts/gpu_check.sh --list                 # the cases, in the order they run
#
# It runs scripts/gpu_check.py with $PYTHON (default python3) and src/ on PYTHONPATH. That installs the
# wheels carried in .whl/ (scripts/fetch_gpu_wheels.sh: only what the GPU image lacks) into $SITE (default
# /tmp/site) with `pip install --no-index --no-deps --target` (nothing goes into the image's own
# site-packages; a rerun on the same machine skips it), asserts that torch sees CUDA, builds its model and
# data, runs the cases of scripts/gpu_cases.py under a time budget (--budget, default 330 s from here),
# prints each row as it finishes, and leaves gpu_check.json and gpu_check_logs.tar.gz in $OUT (else
# $WORK/out). `scripts/gpu_check.sh --help` lists every option.
#
# Environment: PYTHON, SITE, WORK (default /tmp/scalelora-gpu-check), OUT, CARRY_DIR (default .whl),
# NUM_GPUS (default: all), STEPS (default 40), BUDGET, CASES (as --only).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
export PYTHON=${PYTHON:-python3}
export GPU_CHECK_STARTED=${GPU_CHECK_STARTED:-$(date +%s)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" "$ROOT/scripts/gpu_check.py" "$@"
