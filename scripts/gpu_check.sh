#!/usr/bin/env bash
# The GPU half of the scale-out checks, in one command on a machine with an NVIDIA GPU:
#
#   scripts/gpu_check.sh                        # every case that fits the time budget, most important first
#   scripts/gpu_check.sh --only zero3,4bit      # a subset, e.g. the rerun line the report ends with
#   scripts/gpu_check.sh --dry-run              # any machine, no GPU: resolve every case, check the carry size
#   scripts/gpu_check.sh --list                 # the cases, in the order they run
#
# 1. installs the wheels carried in .whl/ (scripts/fetch_gpu_wheels.sh: only what the GPU image lacks)
#    into $SITE (default /tmp/site) with `pip install --no-index --no-deps --target`, and puts it and src/
#    on PYTHONPATH (nothing is installed into the image's own site-packages; a rerun on the same machine
#    skips this);
# 2. runs scripts/gpu_check.py with $PYTHON (default python3), which asserts that torch sees CUDA, builds
#    its model and data, runs the cases of scripts/gpu_cases.py under a time budget (--budget, default
#    330 s from here), prints each row as it finishes, and leaves gpu_check.json and gpu_check_logs.tar.gz
#    in $OUT (else $WORK/out). `scripts/gpu_check.sh --help` lists every option.
#
# Environment: PYTHON, SITE, WORK (default /tmp/scalelora-gpu-check), OUT, CARRY_DIR (default .whl),
# NUM_GPUS (default: all), STEPS (default 40), BUDGET, CASES (as --only).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
CARRY_DIR=${CARRY_DIR:-$ROOT/.whl}
export GPU_CHECK_STARTED=${GPU_CHECK_STARTED:-$(date +%s)}
export PYTHON CARRY_DIR
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}

install=1
for arg in "$@"; do
  case $arg in
    --dry-run | --list | -h | --help | --cpu-smoke) install=0 ;;
  esac
done

shopt -s nullglob
wheels=("$CARRY_DIR"/*.whl)
if ((install && ${#wheels[@]})); then
  # the wheels' names and sizes: when $SITE already holds this set (a rerun on a warm machine), skip
  wanted=$(for wheel in "${wheels[@]}"; do echo "$(basename "$wheel") $(wc -c < "$wheel")"; done)
  if [[ ! -f $SITE/.gpu_check_wheels || $(< "$SITE/.gpu_check_wheels") != "$wanted" ]]; then
    echo "gpu_check: installing ${#wheels[@]} carried wheel(s) into $SITE: $(for w in "${wheels[@]}"; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" || exit 1
    echo "$wanted" > "$SITE/.gpu_check_wheels"
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" "$ROOT/scripts/gpu_check.py" "$@"
