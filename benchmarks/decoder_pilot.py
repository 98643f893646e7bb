"""The decoder pilot (issue 29): SmolLM2-135M + LoRA on its float32 base (D1) and on a 4-bit nf4 base
(D2), the same number of optimizer steps each, validation only, to size the study's D1-D3 rows.

Each side is `python -m scalelora.train --config results_emotion_decoder train.max_steps=N
eval.every=N data.test_split=null` (D2 adds `model.load_in_4bit=true`) in a fresh process; then each
run folder predicts the validation split with `python -m scalelora.predict` (as a user would). The JSON
holds, per side: speed, the trainer's phase times, peak host memory, validation accuracy and macro-F1
(from the run's summary.json), and the two sides' agreement: the share of validation texts on which
they predict the same label.

    python benchmarks/decoder_pilot.py --steps 100 --out benchmarks/results/decoder-pilot-cpu.json \
        --note "machine quiet"

`--reuse` takes a side's finished run folder under `--runs-dir` instead of training it again (only
when its summary.json has the same number of steps). Extra `key=value` arguments go to both sides (the
tests point them at a tiny model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `benchmarks` and `scalelora` from this checkout
    sys.path.insert(0, str(ROOT))

SIDES = {"d1_float32_base": [], "d2_4bit_base": ["model.load_in_4bit=true"]}
RECIPE = "results_emotion_decoder"
KEPT = (
    "commit",
    "trainable_pct",
    "samples_per_second",
    "train_seconds",
    "phase_seconds",
    "steady_state",
    "peak_memory_gb",
    "precision",
    "global_step",
)


def train(side: str, folder: Path, steps: int, extra: list[str]) -> None:
    command = [
        sys.executable,
        "-m",
        "scalelora.train",
        "--config",
        RECIPE,
        f"train.max_steps={steps}",
        f"eval.every={steps}",
        "data.test_split=null",
        f"output_dir={folder}",
        "overwrite=true",
        *SIDES[side],
        *extra,
    ]
    print(f"decoder_pilot: {side}: training {steps} steps", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def predict(folder: Path, texts: Path, out: Path) -> list[str]:
    command = [sys.executable, "-m", "scalelora.predict", "--adapter", str(folder), "--input", str(texts)]
    subprocess.run([*command, "--output", str(out)], check=True)
    return [json.loads(line)["label"] for line in out.read_text().splitlines() if line.strip()]


def side_facts(summary: dict[str, Any], folder: Path) -> dict[str, Any]:
    validation = summary["eval"]["validation"]
    return {
        **{key: summary.get(key) for key in KEPT},
        "validation": {"accuracy": validation["accuracy"], "macro_f1": validation["macro_f1"]},
        "run_folder": str(folder),
    }


def finished(folder: Path, steps: int) -> bool:
    summary = folder / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("global_step") == steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per side")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "decoder-pilot"), help="the run folders")
    parser.add_argument("--reuse", action="store_true", help="take finished run folders with the same steps")
    parser.add_argument("--out", required=True, help="the JSON to write")
    parser.add_argument("--note", help="a free-text note stored in the JSON (e.g. what else the machine ran)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="passed to both sides")
    args = parser.parse_args(argv)
    from benchmarks.bench import environment
    from scalelora.files import atomic_write_json

    runs = Path(args.runs_dir)
    sides: dict[str, Any] = {}
    labels: dict[str, list[str]] = {}
    for side in SIDES:
        folder = runs / side
        if not (args.reuse and finished(folder, args.steps)):
            train(side, folder, args.steps, args.overrides)
        summary = json.loads((folder / "summary.json").read_text())
        sides[side] = side_facts(summary, folder)
        # the validation file the run evaluated on: its data folder's validation.jsonl
        texts = Path(summary["data_source"]) / "validation.jsonl"
        labels[side] = predict(folder, texts, runs / f"{side}-validation.jsonl")
    d1, d2 = (labels[side] for side in SIDES)
    same = sum(a == b for a, b in zip(d1, d2))
    report = {
        **environment(),
        "what": f"{RECIPE}: {args.steps} optimizer steps of its batch per side, validation split only",
        "steps": args.steps,
        "overrides": args.overrides,
        "sides": sides,
        "agreement": {"validation_texts": len(d1), "same_label": same, "share": round(same / len(d1), 4)},
        "d2_over_d1_samples_per_second": round(
            sides["d2_4bit_base"]["samples_per_second"] / sides["d1_float32_base"]["samples_per_second"], 3
        ),
    }
    if args.note:
        report["note"] = args.note
    atomic_write_json(Path(args.out), report)
    print(json.dumps({k: report[k] for k in ("agreement", "d2_over_d1_samples_per_second")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
