"""The data path at scale: N synthetic rows from launch to the first optimizer step, peak memory, the
memory of a second process, and the peer a user would write, in the same run.

```bash
# the committed JSON (a quiet machine: nothing else running; about an hour on 2 cores)
python benchmarks/data_scale.py --rows 100000,1000000,2000000 --out benchmarks/results/data-scale-cpu.json \
    --png docs/img/data-scale.png --note "machine quiet"
python benchmarks/data_scale.py --dry-run    # a minute: 2,000 rows, every measurement runs, nothing kept
python benchmarks/data_scale.py --plot benchmarks/results/data-scale-cpu.json --png docs/img/data-scale.png
```

For each N and each variant (VARIANTS: `short-2`, short texts and 2 classes, like the 2M-row JSONL of
issue 27; `mixed-500`, 500 classes with a long tail and 1% of texts about 2,000 tokens long) it writes a
seeded JSONL folder (N training rows, 2,000 validation rows) and measures, each in a fresh process:

- `scalelora`: `python -m scalelora.train --config quickstart data.path=FOLDER train.max_steps=1` with an
  empty data cache (`data.cache=auto`: in memory under 32 MiB of files, on disk from there): seconds
  from launch to the first log line, to the first `scalelora: data:` line and to the first optimizer
  step (its log line, `train.log_every=1`), the data phase's stage lines with their times, where the
  data was held (`data_where`), and peak RSS (VmHWM) at the first step;
- `scalelora_cached`: the same command again, the cache now built (null when the folder was held in
  memory: there is no disk cache to reuse);
- `peer`: `datasets.load_dataset("json", ...)` plus a batched `map` of the same tokenizer call (the
  model's tokenizer, truncation at the quickstart's max_length 64), with its own empty `datasets` cache:
  load, tokenize and launch-to-tokenized seconds, peak RSS;
- `two_processes` (`--two-processes`, on by default): `data.load_data` and the first training batch under
  `accelerate launch --cpu --num_processes 2` with an empty cache: each rank's RSS and PSS before and
  after, and its peak; `second_to_first_data_memory` is rank 1's RSS increase over rank 0's.

`--tokenize-modes ROWS` also times tokenizing ROWS training texts three ways in fresh processes: the
tokenizer's own threads (TOKENIZERS_PARALLELISM=true, what scalelora uses), one thread, and 2 forked
processes of one thread each (what `datasets.map(num_proc=2)` does).

`--dry-run` runs every measurement on 2,000 rows (at most 20,000 with `--rows`) and 200 validation rows,
to check the benchmark works, not to measure: tests/test_data_scale.py runs it with a tiny model
(`--model`). Every child inherits TOKENIZERS_PARALLELISM as set for the benchmark (unset: the
tokenizer's own threads, on both sides). No test asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

VARIANTS = {
    "short-2": {"classes": 2, "long_share": 0.0},
    "mixed-500": {"classes": 500, "long_share": 0.01},
}
VALIDATION_ROWS = 2_000
DRY_RUN_ROWS, DRY_RUN_MAX_ROWS, DRY_RUN_VALIDATION_ROWS = 2_000, 20_000, 200
SHORT_WORDS = (5, 40)
LONG_WORDS = 1_500  # about 2,000 MiniLM tokens
RECIPE = "quickstart"
MODEL = "minilm-l6"  # the quickstart's
MAX_LENGTH = 64  # the quickstart's data.max_length: the peer truncates there too
TARGETS = {
    "first_step_seconds_at_2m": 90.0,
    "first_step_over_peer_load_tokenize": 1.2,
    "peak_rss_gib": 2.5,
    "second_to_first_data_memory": 0.3,
}
WORDS_TEXT = (
    "the of and a to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part film movie story plot acting great bad really quite good best worst boring funny "
    "scene character director ending music performance script love hate beautiful terrible wonderful awful "
    "slow fast brilliant dull moving charming delightful tedious bland messy strong weak clever stupid"
)
WORDS = WORDS_TEXT.split(" ")


# --- data -----------------------------------------------------------------------------------------


def generate(
    folder: Path, rows: int, variant: str, seed: int = 0, validation_rows: int = VALIDATION_ROWS
) -> dict[str, Any]:
    """A seeded JSONL folder: `rows` training rows and `validation_rows` validation rows of `variant`."""
    import numpy as np

    spec = VARIANTS[variant]
    rng = np.random.default_rng([seed, rows, spec["classes"]])
    folder.mkdir(parents=True, exist_ok=True)
    words = np.array(WORDS)
    weights = 1.0 / np.arange(1, len(words) + 1)  # Zipf-like word frequencies
    weights /= weights.sum()
    classes = spec["classes"]
    class_p = 1.0 / np.arange(1, classes + 1) ** 1.1  # a long tail (500 classes: the rarest ~1e-4)
    class_p /= class_p.sum()
    names = ["neg", "pos"] if classes == 2 else [f"c{k:03d}" for k in range(classes)]
    sizes = {}
    for split, count in (("train", rows), ("validation", validation_rows)):
        labels = rng.choice(classes, size=count, p=class_p)
        long = rng.random(count) < spec["long_share"]
        lengths = np.where(long, LONG_WORDS, rng.integers(SHORT_WORDS[0], SHORT_WORDS[1] + 1, size=count))
        drawn = rng.choice(len(words), size=int(lengths.sum()), p=weights)
        ends = np.cumsum(lengths)
        with (folder / f"{split}.jsonl").open("w", encoding="utf-8") as handle:
            start = 0
            for end, label in zip(ends.tolist(), labels.tolist()):
                text = " ".join(words[drawn[start:end]].tolist())
                handle.write(json.dumps({"text": text, "label": names[label]}) + "\n")
                start = end
        sizes[split] = (folder / f"{split}.jsonl").stat().st_size
    (folder / "labels.json").write_text(json.dumps(names))  # the rarest classes may miss a split
    return {"rows": rows, "validation_rows": validation_rows, "bytes": sizes, "variant": variant, **spec}


# --- children -------------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT / "src")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


def peak_rss(pid: int) -> int | None:
    """A live process's peak RSS so far (VmHWM), bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_scalelora(folder: Path, out: Path, cache: Path, model: str = MODEL) -> dict[str, Any]:
    """One real CLI run to its first optimizer step and on to the end; timings from its log lines."""
    command = [
        sys.executable,
        "-m",
        "scalelora.train",
        "--config",
        RECIPE,
        f"data.path={folder}",
        f"model.name={model}",
        f"output_dir={out}",
        "overwrite=true",
        "train.max_steps=1",
        "train.log_every=1",
        "eval.every=1000000",
        "data.test_split=null",
        f"data.cache_dir={cache}",
    ]
    started = time.time()
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=child_env()
    )
    lines: list[tuple[float, str]] = []
    first_step: dict[str, Any] = {}

    def read() -> None:
        for line in process.stderr:
            now = time.time() - started
            lines.append((now, line.rstrip()))
            if not first_step and re.match(r"scalelora: step 1/", line):
                first_step.update(seconds=now, peak_rss_bytes=peak_rss(process.pid))

    reader = threading.Thread(target=read)
    reader.start()
    _, status, usage = os.wait4(process.pid, 0)
    reader.join()
    wall = time.time() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not first_step:
        print("\n".join(text for _, text in lines[-30:]), file=sys.stderr)
        raise RuntimeError(f"scalelora run on {folder} failed (exit {code})")
    ours = [(t, text) for t, text in lines if text.startswith("scalelora:")]
    data_lines = [(round(t, 2), text) for t, text in ours if text.startswith("scalelora: data:")]
    summary = json.loads((out / "summary.json").read_text())
    where = (
        re.search(r"\((in memory|[\d,.]+ MiB, cached on disk)\)", data_lines[0][1]) if data_lines else None
    )
    return {
        "command": " ".join(command[1:]),
        "data_where": where.group(1) if where else None,
        "first_line_seconds": round(ours[0][0], 2) if ours else None,
        "first_data_line_seconds": data_lines[0][0] if data_lines else None,
        "first_step_seconds": round(first_step["seconds"], 2),
        "peak_rss_bytes_at_first_step": first_step["peak_rss_bytes"],
        "peak_rss_bytes": int(usage.ru_maxrss) * 1024,
        "wall_seconds": round(wall, 2),
        "phase_seconds": summary.get("phase_seconds"),
        "truncated": summary.get("truncated"),
        "data_lines": data_lines,
    }


PEER = r"""
import json, os, resource, sys, time
started = float(sys.argv[1])
import datasets
from transformers import AutoTokenizer
from scalelora.models import resolve_model_path
datasets.disable_progress_bars()
tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(sys.argv[5]))
t0 = time.time()
ds = datasets.load_dataset("json", data_files={"train": sys.argv[2] + "/train.jsonl",
    "validation": sys.argv[2] + "/validation.jsonl"}, cache_dir=sys.argv[3])
t1 = time.time()
ds = ds.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=int(sys.argv[4])), batched=True)
t2 = time.time()
print(json.dumps({"load_seconds": t1 - t0, "tokenize_seconds": t2 - t1, "load_tokenize_seconds": t2 - t0,
    "launch_to_tokenized_seconds": t2 - started, "rows": len(ds["train"]),
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_peer(folder: Path, cache: Path, model: str = MODEL) -> dict[str, Any]:
    """The plain `datasets` script, in a fresh process with an empty `datasets` cache."""
    done = subprocess.run(
        [sys.executable, "-c", PEER, repr(time.time()), str(folder), str(cache), str(MAX_LENGTH), model],
        capture_output=True,
        text=True,
        env=child_env(),
    )
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise RuntimeError(f"the peer failed on {folder} (exit {done.returncode})")
    return {
        k: round(v, 2) if isinstance(v, float) else v
        for k, v in json.loads(done.stdout.splitlines()[-1]).items()
    }


RANK = r"""
import json, os, sys, time
import psutil
from accelerate import PartialState
from scalelora import data as data_lib
from scalelora.config import load_config
from scalelora.models import load_tokenizer
state = PartialState(cpu=True)  # torchrun-launched CPU processes (see runtime.build_accelerator)
cfg = load_config(sys.argv[2], [f"data.path={sys.argv[1]}", f"data.cache_dir={sys.argv[3]}",
    "data.test_split=null", "data.cache=always", f"model.name={sys.argv[5]}"])
tokenizer = load_tokenizer(cfg.model)
me = psutil.Process()
before = me.memory_full_info()
started = time.time()
splits, tokenized = data_lib.load_data(cfg, tokenizer, state, lambda line: None)
loader = data_lib.train_dataloader(tokenized["train"], cfg.data, cfg.train.batch_size, cfg.seed,
    data_lib.PadCollator(tokenizer.pad_token_id))
next(iter(loader))
after = me.memory_full_info()
status = dict(line.split(":", 1) for line in open(f"/proc/{os.getpid()}/status").read().splitlines())
result = {"rank": state.process_index, "seconds": time.time() - started, "rss_before": before.rss,
    "rss_after": after.rss, "pss_before": before.pss, "pss_after": after.pss,
    "peak_rss_bytes": int(status["VmHWM"].split()[0]) * 1024}
open(os.path.join(sys.argv[4], f"rank-{state.process_index}.json"), "w").write(json.dumps(result))
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(folder: Path, cache: Path, workdir: Path, model: str = MODEL) -> dict[str, Any]:
    """`data.load_data` and the first training batch on 2 CPU processes (one machine), with an empty
    on-disk cache (`data.cache=always`: the shared path, whatever the size)."""
    script = workdir / "rank.py"
    script.write_text(RANK)
    results = workdir / "ranks"
    results.mkdir(exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accel_configs" / "cpu_2proc.yaml"),
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(script),
        str(folder),
        RECIPE,
        str(cache),
        str(results),
        model,
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env())
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise RuntimeError(f"the 2-process data run failed on {folder} (exit {done.returncode})")
    ranks = [json.loads((results / f"rank-{r}.json").read_text()) for r in (0, 1)]
    shutil.rmtree(results)
    grown = [r["rss_after"] - r["rss_before"] for r in ranks]
    pss = [r["pss_after"] - r["pss_before"] for r in ranks]
    return {
        "cache": "always",
        "ranks": ranks,
        "data_rss_growth_bytes": grown,
        "data_pss_growth_bytes": pss,
        "second_to_first_data_memory": grown[1] / grown[0] if grown[0] > 0 else None,
        "second_to_first_data_pss": pss[1] / pss[0] if pss[0] > 0 else None,
    }


TOKENIZE = r"""
import json, multiprocessing, os, sys, time
import pyarrow.json as pajson
from scalelora import tokens
from scalelora.models import resolve_model_path
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm-l6"))
table = pajson.read_json(sys.argv[1]).slice(0, int(sys.argv[2]))
table = table.append_column("idx", __import__("pyarrow").array(range(table.num_rows)))
processes = int(sys.argv[3])

def work(part):
    return sum(cut for _, cut in tokens.tokenize_batches(part, tokenizer, int(sys.argv[4])))

started = time.time()
if processes == 1:
    work(table)
else:
    size = -(-table.num_rows // processes)
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(work, [table.slice(i * size, size) for i in range(processes)])
print(json.dumps({"seconds": time.time() - started, "rows": table.num_rows}))
"""


def tokenize_modes(folder: Path, rows: int) -> dict[str, Any]:
    """Tokenizing `rows` training texts: the tokenizer's own threads, one thread, 2 processes."""
    modes = {"own_threads": ("true", 1), "one_thread": ("false", 1), "two_processes": ("false", 2)}
    out: dict[str, Any] = {"rows": rows, "os_cpu_count": os.cpu_count()}
    for name, (parallel, processes) in modes.items():
        env = {**child_env(), "TOKENIZERS_PARALLELISM": parallel}
        command = [
            sys.executable,
            "-c",
            TOKENIZE,
            str(folder / "train.jsonl"),
            str(rows),
            str(processes),
            str(MAX_LENGTH),
        ]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise RuntimeError(f"tokenize mode {name} failed")
        out[name] = round(json.loads(done.stdout.splitlines()[-1])["seconds"], 2)
    out["fastest"] = min(modes, key=lambda m: out[m])
    return out


# --- the report -----------------------------------------------------------------------------------


def measure(
    rows: int,
    variant: str,
    workdir: Path,
    two_processes: bool,
    model: str = MODEL,
    validation_rows: int = VALIDATION_ROWS,
) -> dict[str, Any]:
    folder = workdir / f"{variant}-{rows}"
    print(f"data_scale: generating {rows:,} rows of {variant}", file=sys.stderr, flush=True)
    result: dict[str, Any] = {"data": generate(folder, rows, variant, validation_rows=validation_rows)}
    cache = workdir / f"cache-{variant}-{rows}"
    print("data_scale: scalelora (cold cache)", file=sys.stderr, flush=True)
    result["scalelora"] = run_scalelora(folder, workdir / "out", cache, model)
    result["scalelora_cached"] = None  # held in memory: no disk cache for a second run to reuse
    if result["scalelora"]["data_where"] != "in memory":
        print("data_scale: scalelora (cache built)", file=sys.stderr, flush=True)
        result["scalelora_cached"] = run_scalelora(folder, workdir / "out", cache, model)
    shutil.rmtree(cache, ignore_errors=True)
    print("data_scale: peer (datasets.load_dataset + map)", file=sys.stderr, flush=True)
    result["peer"] = run_peer(folder, workdir / f"hf-cache-{variant}-{rows}", model)
    shutil.rmtree(workdir / f"hf-cache-{variant}-{rows}", ignore_errors=True)
    if two_processes:
        print("data_scale: 2 processes", file=sys.stderr, flush=True)
        result["two_processes"] = run_two_processes(folder, cache, workdir, model)
        shutil.rmtree(cache, ignore_errors=True)
    result["ratios"] = ratios(result)
    shutil.rmtree(folder, ignore_errors=True)
    return result


def ratios(result: dict[str, Any]) -> dict[str, float | None]:
    """The comparisons the targets name: launch to first step against the peer's load + tokenize (the
    target's reading, which charges our imports, model load and first step to us alone), against the
    peer's launch to tokenized, and our data phase against the peer's load + tokenize."""
    ours, peer = result["scalelora"], result["peer"]

    def over(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    data_phase = (ours.get("phase_seconds") or {}).get("data")
    return {
        "first_step_over_peer_load_tokenize": over(ours["first_step_seconds"], peer["load_tokenize_seconds"]),
        "first_step_over_peer_launch_to_tokenized": over(
            ours["first_step_seconds"], peer["launch_to_tokenized_seconds"]
        ),
        "data_phase_over_peer_load_tokenize": over(data_phase, peer["load_tokenize_seconds"]),
        "second_to_first_data_memory": (result.get("two_processes") or {}).get("second_to_first_data_memory"),
    }


def environment(note: str | None) -> dict[str, Any]:
    from benchmarks.bench import environment as bench_environment
    from scalelora.runtime import cpu_flags

    env = bench_environment()
    env["machine"]["cpu_flags"] = sorted(cpu_flags())
    env["tokenizers_parallelism"] = os.environ.get("TOKENIZERS_PARALLELISM")
    if note:
        env["note"] = note
    return env


def plot(report: dict[str, Any], png: Path) -> bool:
    """Launch to first step and peak RSS against N (log scale), scalelora and the peer, per variant.
    False (no figure) without matplotlib."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        print("data_scale: matplotlib is not installed: no figure", file=sys.stderr)
        return False
    from scalelora.report import figure

    with figure(png, ncols=2, figsize=(9.6, 3.8)) as (fig, axes):
        for variant in VARIANTS:
            points = sorted((int(n), r[variant]) for n, r in report["results"].items() if variant in r)
            if not points:
                continue
            ns = [n for n, _ in points]
            axes[0].plot(
                ns,
                [r["scalelora"]["first_step_seconds"] for _, r in points],
                "o-",
                label=f"scalelora, {variant}",
            )
            axes[0].plot(
                ns,
                [r["peer"]["load_tokenize_seconds"] for _, r in points],
                "s--",
                label=f"peer load+tokenize, {variant}",
            )
            axes[1].plot(
                ns,
                [r["scalelora"]["peak_rss_bytes_at_first_step"] / 2**30 for _, r in points],
                "o-",
                label=f"scalelora, {variant}",
            )
            axes[1].plot(
                ns, [r["peer"]["peak_rss_bytes"] / 2**30 for _, r in points], "s--", label=f"peer, {variant}"
            )
        axes[0].set(
            xscale="log", xlabel="training rows", ylabel="seconds", title="launch to first optimizer step"
        )
        axes[1].set(xscale="log", xlabel="training rows", ylabel="GiB", title="peak RSS")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", default=None, help="training rows, comma-separated (default 100000,1000000,2000000)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--no-two-processes", action="store_true", help="skip the 2-process memory run")
    parser.add_argument(
        "--tokenize-modes", type=int, default=None, help="also time tokenizing this many rows 3 ways"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"{DRY_RUN_ROWS:,} rows (--rows: at most {DRY_RUN_MAX_ROWS:,}) and {DRY_RUN_VALIDATION_ROWS} "
        "validation rows of each variant, every measurement: checks the benchmark, measures nothing",
    )
    parser.add_argument(
        "--model", default=MODEL, help="model.name for every side (default: the quickstart's)"
    )
    parser.add_argument("--out", type=Path, help="the JSON report")
    parser.add_argument("--png", type=Path, help="the figure")
    parser.add_argument("--plot", type=Path, help="only redraw the figure of this JSON report")
    parser.add_argument(
        "--workdir", type=Path, help="where the data and runs go (default: a temporary folder)"
    )
    parser.add_argument("--note", help="a free-text note stored in the JSON (e.g. what else the machine ran)")
    args = parser.parse_args(argv)
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.png or args.plot.with_suffix(".png"))
        return 0
    rows = [int(n) for n in (args.rows or ("" if args.dry_run else "100000,1000000,2000000")).split(",") if n]
    if args.dry_run:
        rows = rows or [DRY_RUN_ROWS]
        if max(rows) > DRY_RUN_MAX_ROWS:
            parser.error(f"--dry-run takes at most {DRY_RUN_MAX_ROWS:,} rows")
    validation_rows = DRY_RUN_VALIDATION_ROWS if args.dry_run else VALIDATION_ROWS
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")
    report: dict[str, Any] = {
        "benchmark": "data_scale",
        "command": "python benchmarks/data_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "dry_run": args.dry_run,
        "recipe": RECIPE,
        "model": args.model,
        "max_length": MAX_LENGTH,
        "targets": TARGETS,
        "environment": environment(args.note),
        "results": {},
    }
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="data-scale-"))
    try:
        for n in rows:
            for variant in variants:
                report["results"].setdefault(str(n), {})[variant] = measure(
                    n, variant, workdir, not args.no_two_processes, args.model, validation_rows
                )
                if args.out:
                    args.out.write_text(json.dumps(report, indent=1) + "\n")  # what is done so far
        if args.tokenize_modes:
            folder = workdir / "modes"
            generate(folder, args.tokenize_modes, "short-2")
            report["tokenize_modes"] = tokenize_modes(folder, args.tokenize_modes)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report["environment"]["load_average_end"] = list(os.getloadavg())
    text = json.dumps(report, indent=1) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    if args.png:
        plot(report, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
