#!/usr/bin/env bash
# The teacher -> LoRA student study for one recipe: teacher full fine-tune, LoRA students on the frozen
# teacher with and without KD, head-only, linear probe, LoRA on the pretrained base with KD, TF-IDF + LR.
# Usage: launch/pipeline.sh RECIPE [--out DIR] [--runs a,b] [key=value | RUN:key=value ...]
# Example: launch/pipeline.sh rotten_tomatoes data.max_train_samples=2000 teacher_full:train.epochs=3
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 RECIPE [--out DIR] [--runs a,b] [key=value | RUN:key=value ...]" >&2
    exit 2
fi
recipe="$1"
shift
cd "$(dirname "$0")/.."
export SCALELORA_DATA_DIR="${SCALELORA_DATA_DIR:-$(cd .. && pwd)/shared/data}"
export TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec "${PYTHON:-python}" -m scalelora.pipeline --config "$recipe" "$@"
