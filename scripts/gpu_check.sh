#!/usr/bin/env bash
# The GPU half of the scale-out checks, in one command on a machine with NVIDIA GPUs:
#
#   scripts/gpu_check.sh                 # all cases
#   CASES="bf16 zero3" scripts/gpu_check.sh
#
# 1. installs the wheels in .whl/ (scripts/fetch_gpu_wheels.sh) that the GPU image lacks, into
#    $SITE (default /tmp/site) with `pip install --no-index --no-deps --target`, and puts it and
#    src/ on PYTHONPATH (nothing is installed into the image's own site-packages);
# 2. builds a random-weight model of a real shape (SmolLM2-135M's Llama geometry: 30 layers,
#    hidden 576, 9 heads, 3 KV heads), a word-level tokenizer and a learnable 2-class dataset, so
#    it needs no network;
# 3. trains it (LoRA r=8) in each case below, checks the saved adapter, and prints a table:
#    case, ok/failed, samples/s, peak GPU memory (GB, main process), seconds, note.
#
# Cases: bf16, fp16 (plain Accelerate, 1 GPU); zero2, zero3, zero3_resume, zero3_offload (DeepSpeed,
# NUM_GPUS processes); 8bit, 4bit (bitsandbytes, 1 GPU); 4bit_zero3 (QLoRA under ZeRO-3).
# zero3 runs in fp32 so the reloaded adapter must reproduce its logits closely (1e-3); every case
# checks each saved LoRA tensor is non-empty with rank 8 (the ZeRO-3 failure is a few-byte adapter).
# Environment: NUM_GPUS (default: all), STEPS (default 40), WORK (default /tmp/scalelora-gpu-check),
# SITE, FORCE_WHEELS=1 (install every wheel in .whl/, also those the image has).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
WORK=${WORK:-/tmp/scalelora-gpu-check}
SITE=${SITE:-/tmp/site}
STEPS=${STEPS:-40}
CASES=${CASES:-bf16 fp16 zero2 zero3 zero3_resume zero3_offload 8bit 4bit 4bit_zero3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}

if ! command -v nvidia-smi > /dev/null || ! nvidia-smi --list-gpus > /dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi fails); the CPU half runs in the test suite" >&2
  exit 2
fi
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi --list-gpus | wc -l)}
mkdir -p "$WORK/logs" "$WORK/runs"

# --- 1. wheels the image lacks ------------------------------------------------------------------
shopt -s nullglob
wheels=("$ROOT"/.whl/*.whl)
if ((${#wheels[@]})); then
  missing=()
  for wheel in "${wheels[@]}"; do
    dist=$(basename "$wheel" | cut -d- -f1)
    if [[ ${FORCE_WHEELS:-0} == 1 ]] || ! python -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2> /dev/null; then
      missing+=("$wheel")
    fi
  done
  if ((${#missing[@]})); then
    echo "gpu_check: installing ${#missing[@]} wheel(s) into $SITE: $(for w in "${missing[@]}"; do basename "$w" | cut -d- -f1; done | tr '\n' ' ')"
    python -m pip install -q --no-index --no-deps --target "$SITE" "${missing[@]}" || exit 1
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

echo "gpu_check: $(date -u +%Y-%m-%dT%H:%MZ) on $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sed -n 1p) x ${NUM_GPUS}"
python - << 'PY'
import importlib.metadata as m

found = []
for name in ["torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "datasets", "evaluate", "wandb"]:
    try:
        found.append(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        found.append(f"{name} MISSING")
print("gpu_check: " + ", ".join(found))
PY

# --- 2. model, tokenizer, data --------------------------------------------------------------------
python - "$WORK" << 'PY' || exit 1
import json, random, sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

work = Path(sys.argv[1])
positive = ["great", "wonderful", "superb", "lovely", "brilliant", "moving", "charming", "delightful"]
negative = ["awful", "boring", "dull", "terrible", "weak", "tedious", "bland", "messy"]
filler = ["the", "film", "movie", "plot", "was", "really", "quite", "story", "acting", "a", "and", "ending"]
specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
vocab = {w: i for i, w in enumerate(specials + positive + negative + filler)}
core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
core.pre_tokenizer = pre_tokenizers.Whitespace()
core.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
)
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
    eos_token="[SEP]", bos_token="[CLS]",
)
model_dir = work / "model"
if not (model_dir / "config.json").is_file():
    torch.manual_seed(0)
    config = LlamaConfig(  # SmolLM2-135M geometry, random weights
        vocab_size=len(vocab), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True,
    )
    LlamaModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
rng = random.Random(0)
data = work / "data"
data.mkdir(exist_ok=True)
for split, n in {"train": 4000, "validation": 256, "test": 256}.items():
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = [rng.choice(filler) for _ in range(rng.randint(8, 40))]
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randint(0, len(words)), rng.choice(positive if label == "pos" else negative))
        rows.append({"text": " ".join(words), "label": label})
    (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
(data / "labels.json").write_text(json.dumps(["neg", "pos"]))
PY

# --- 3. the cases ---------------------------------------------------------------------------------
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
common=(model.name="$WORK/model" data.path="$WORK/data" data.max_length=64 train.batch_size=16
  train.eval_batch_size=64 train.max_steps="$STEPS" train.lr=1e-3 train.log_every=10
  eval.every="$STEPS" eval.load_best_at_end=false checkpoint.every=$((STEPS / 2)) overwrite=true)
single=(python -m scalelora.train --config quickstart)
ds_launch() { echo accelerate launch --config_file "accel_configs/deepspeed_$1.yaml" --num_processes "$NUM_GPUS" --main_process_port "$(free_port)" -m scalelora.train --config quickstart; }

run_case() { # name, command words...
  local name=$1
  shift
  local started=$SECONDS
  "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $((SECONDS - started))" >> "$WORK/results.txt"
  echo "gpu_check: $name finished with exit code $rc in $((SECONDS - started)) s (log: $WORK/logs/$name.log)"
}

: > "$WORK/results.txt"
for case in $CASES; do
  out="$WORK/runs/$case"
  case $case in
    bf16) run_case "$case" "${single[@]}" "${common[@]}" output_dir="$out" train.precision=bf16 ;;
    fp16) run_case "$case" "${single[@]}" "${common[@]}" output_dir="$out" train.precision=fp16 ;;
    zero2) read -ra cmd <<< "$(ds_launch zero2)" && run_case "$case" "${cmd[@]}" "${common[@]}" output_dir="$out" train.precision=bf16 ;;
    zero3) read -ra cmd <<< "$(ds_launch zero3)" && run_case "$case" "${cmd[@]}" "${common[@]}" output_dir="$out" train.precision=no ;;
    zero3_resume) # continue zero3 from its middle checkpoint; the adapter must match the uninterrupted one
      rm -rf "$out" && cp -r "$WORK/runs/zero3" "$out" && rm -rf "$out/checkpoints/step-$STEPS" "$out/adapter" "$out/summary.json"
      read -ra cmd <<< "$(ds_launch zero3)" && run_case "$case" "${cmd[@]}" "${common[@]}" output_dir="$out" train.precision=no overwrite=false resume=auto ;;
    zero3_offload) read -ra cmd <<< "$(ds_launch zero3_offload)" && run_case "$case" "${cmd[@]}" "${common[@]}" output_dir="$out" train.precision=bf16 ;;
    8bit) run_case "$case" "${single[@]}" "${common[@]}" output_dir="$out" train.precision=bf16 model.load_in_8bit=true ;;
    4bit) run_case "$case" "${single[@]}" "${common[@]}" output_dir="$out" train.precision=bf16 model.load_in_4bit=true ;;
    4bit_zero3) read -ra cmd <<< "$(ds_launch zero3)" && run_case "$case" "${cmd[@]}" "${common[@]}" output_dir="$out" train.precision=bf16 model.load_in_4bit=true model.dtype=bfloat16 ;;
    *) echo "gpu_check: unknown case $case" >&2 ;;
  esac
done

# --- the table ------------------------------------------------------------------------------------
python - "$WORK" << 'PY'
import json, sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from scalelora.checkpoint import check_adapter_weights

work = Path(sys.argv[1])


def reload_matches(run: Path) -> str:
    """Reload the adapter on the base with plain transformers + PEFT and compare its probabilities."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    summary = json.loads((run / "summary.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(work / "model", num_labels=2, pad_token_id=0)
    model = PeftModel.from_pretrained(base, run / "adapter").cuda().eval()
    rows = summary["sample_predictions"]
    enc = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt").to("cuda")
    with torch.no_grad():
        probs = torch.softmax(model(**enc).logits.float(), -1).cpu()
    labels = summary["labels"]
    worst = max(abs(float(probs[i, labels.index(r["after"])]) - r["after_confidence"]) for i, r in enumerate(rows))
    if worst > 1e-3:
        raise AssertionError(f"reloaded adapter differs from the trained model by {worst:.2e}")
    return f"reload max |dp|={worst:.1e}"


print()
print(f"| case | result | samples/s | peak GPU GB | seconds | note |")
print(f"|---|---|---|---|---|---|")
failed = 0
for line in (work / "results.txt").read_text().splitlines():
    name, rc, seconds = line.split()
    run = work / "runs" / name
    note, speed, peak = "", "", ""
    ok = rc == "0"
    try:
        if not ok:
            log = (work / "logs" / f"{name}.log").read_text().strip().splitlines()
            errors = [l for l in log if "error" in l.lower()] or log[-1:]
            raise AssertionError(errors[-1][:140] if errors else f"exit code {rc}")
        summary = json.loads((run / "summary.json").read_text())
        speed = f"{summary['samples_per_second']:.0f}"
        peak = f"{(summary.get('peak_memory_gb') or {}).get('gpu') or 0:.2f}"
        check_adapter_weights(run / "adapter", 8)
        note = f"acc={summary['eval']['validation']['accuracy']:.3f}"
        if summary.get("deepspeed"):
            note += f" zero{summary['deepspeed']['zero_stage']}"
        if name == "zero3":
            note += "; " + reload_matches(run)
        if name == "zero3_resume":
            a = load_file(str(work / "runs" / "zero3" / "adapter" / "adapter_model.safetensors"))
            b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
            diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
            if diff > 1e-3:
                raise AssertionError(f"resumed adapter differs from the uninterrupted one by {diff:.2e}")
            note += f"; resumed vs uninterrupted max diff {diff:.1e}"
    except Exception as err:  # report every case, whatever failed
        ok = False
        note = f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
    failed += not ok
    print(f"| {name} | {'ok' if ok else 'FAILED'} | {speed} | {peak} | {seconds} | {note} |")
sys.exit(1 if failed else 0)
PY
