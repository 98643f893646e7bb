"""The GPU check's driver (scripts/gpu_check.sh runs it with $PYTHON and the environment it needs).

    scripts/gpu_check.sh                      # every case that fits the time budget, most important first
    scripts/gpu_check.sh --only zero3,4bit    # a subset (what a case starts from is run first when missing)
    scripts/gpu_check.sh --dry-run            # on any machine: resolve every case's config and command,
                                              # check the carry size, run nothing
    scripts/gpu_check.sh --list

It installs the carried wheels (.whl/, scripts/fetch_gpu_wheels.sh: what the GPU image lacks) into --site,
asserts that torch sees CUDA before anything runs (a CUDA-less torch fails the check), builds a
random-weight model of a real shape (SmolLM2-135M's Llama geometry), a word-level tokenizer, a learnable
2-class dataset and a small model teacher, so it needs no network, then runs the cases of
scripts/gpu_cases.py one after another, each under its own timeout, and prints each result row as it
finishes: case, ok/FAILED, steady-state samples/s (summary.json `steady_state`, warm-up steps left out),
peak GPU memory of the main process, seconds, note. A case starts only while its expected time fits in the
budget (--budget, counted from the start of gpu_check.sh); the rest are reported as not run, with the
--only command that runs them. After every case it rewrites the JSON report (gpu_check.json: machine, GPU,
date, every package version, the carry, one row per case) and the archive of logs (gpu_check_logs.tar.gz)
in --out, which defaults to $OUT where that is set (the lent GPU machines' folder that comes back).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_cases import ACCEL_CONFIGS, BASE, BY_NAME, CASES, LORA_R, STEPS, TOY, Case, select  # noqa: E402

REPORT = "gpu_check.json"
LOGS = "gpu_check_logs.tar.gz"
MANIFEST = ROOT / "scripts" / "gpu_carry.json"
CARRY_LIMIT_MIB = 60  # of the 64 MiB a lent GPU machine takes in all: the rest is headroom
LOGS_LIMIT = 15 * 2**20  # a file that comes back from such a machine is at most 16 MiB
CHECKS = (
    "reload",
    "same_adapter_as",
    "min_accuracy",
    "distilled",
    "predict_export",
    "peak_below",
    "compiled",
)
# the versions every report records by name (the full list of installed distributions goes in too)
KEY_PACKAGES = [
    "torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "datasets", "evaluate",
    "huggingface-hub", "tokenizers", "safetensors", "numpy", "scipy", "scikit-learn", "pandas", "pyarrow",
    "fsspec", "pydantic", "pydantic-core", "dill", "multiprocess", "hjson", "triton", "ninja", "matplotlib",
    "pyyaml", "tqdm", "typing-extensions", "packaging", "psutil", "wandb",
]  # fmt: skip
# Llama geometry of the random base (SmolLM2-135M) and of the teacher; `tiny` for the CPU smoke test
GEOMETRY = {
    "full": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "teacher_layers": 4, "rows": {"train": 4000, "validation": 256, "test": 256}},
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 2, "teacher_layers": 2, "rows": {"train": 160, "validation": 48, "test": 48}},
}  # fmt: skip


class CheckFailed(Exception):
    """A case ran but a check of its outputs failed."""


@dataclass
class Context:
    work: Path
    out: Path
    carry: Path
    python: str
    steps: int
    num_gpus: int
    budget: float
    started: float
    smoke: bool = False
    child: subprocess.Popen | None = None

    @property
    def deadline(self) -> float:
        return self.started + self.budget

    def run_dir(self, name: str) -> Path:
        return self.work / "runs" / name


@dataclass
class Row:
    name: str
    why: str
    result: str = "not_run"  # ok, failed, timeout, skipped, not_run
    samples_per_s: float | None = None
    peak_gpu_gb: float | None = None
    seconds: float | None = None
    note: str = ""
    exit_code: int | None = None
    command: str = ""
    log: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        speed = f"{self.samples_per_s:.0f}" if self.samples_per_s is not None else ""
        peak = f"{self.peak_gpu_gb:.2f}" if self.peak_gpu_gb is not None else ""
        seconds = f"{self.seconds:.0f}" if self.seconds is not None else ""
        shown = {"ok": "ok", "failed": "FAILED", "timeout": "TIMEOUT"}.get(self.result, self.result)
        return f"| {self.name} | {shown} | {speed} | {peak} | {seconds} | {self.note} |"


TABLE_HEAD = (
    "| case | result | samples/s (steady) | peak GPU GB | seconds | note |\n|---|---|---|---|---|---|"
)


# --- the carry -----------------------------------------------------------------------------------


def repo_bytes(root: Path = ROOT) -> tuple[int, int]:
    """(bytes, files) of the repository as it travels to a lent machine: tracked and untracked-not-ignored
    files (`git ls-files -co --exclude-standard`), links as links."""
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "-co", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    total = files = 0
    for name in filter(None, listed):
        path = root / os.fsdecode(name)
        if path.is_symlink() or path.is_file():
            total += path.lstat().st_size
            files += 1
    return total, files


def carry_budget(root: Path = ROOT, manifest: Path = MANIFEST) -> dict[str, Any]:
    """The repository plus the carried wheels, model and data (sizes from the committed manifest, as
    written by scripts/fetch_gpu_wheels.sh) against CARRY_LIMIT_MIB."""
    carried = json.loads(manifest.read_text())
    repo, files = repo_bytes(root)
    parts = {
        "repository": repo,
        "wheels": sum(w["bytes"] for w in carried["wheels"]),
        "model": (carried.get("model") or {}).get("bytes", 0),
        "data": (carried.get("data") or {}).get("bytes", 0),
    }
    total = sum(parts.values())
    return {
        "bytes": parts,
        "repository_files": files,
        "wheels": [f"{w['name']}=={w['version']}" for w in carried["wheels"]],
        "total_mib": round(total / 2**20, 2),
        "limit_mib": CARRY_LIMIT_MIB,
        "ok": total <= CARRY_LIMIT_MIB * 2**20,
    }


# --- commands --------------------------------------------------------------------------------------


def model_and_data(ctx: Context, case: Case) -> tuple[Path, Path]:
    if case.model == "minilm":
        return ctx.carry / "models" / "minilm-l6-bf16", ctx.carry / "data" / "rotten_tomatoes"
    return ctx.work / "model", ctx.work / "data"


def case_overrides(ctx: Context, case: Case) -> list[str]:
    model, data = model_and_data(ctx, case)
    values = {
        "model": model,
        "data": data,
        "out": ctx.run_dir(case.name),
        "steps": ctx.steps,
        "half": max(ctx.steps // 2, 1),
        "teacher": ctx.work / "teacher",
    }
    toy = TOY if case.model == "llama" else ()
    return [item.format(**values) for item in (*BASE, *toy, *case.overrides)]


def deepspeed_configs(folder: Path) -> dict[str, Path]:
    """The shipped accelerate + DeepSpeed configs, copied into `folder` with ZeRO-3's
    stage3_param_persistence_threshold at 0 (as tests/test_deepspeed.py does): with "auto" (10 x hidden)
    no LoRA tensor of this model is partitioned, so a rank-local save would look complete."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for launch, shipped in ACCEL_CONFIGS.items():
        accel = yaml.safe_load((ROOT / shipped).read_text())
        ds = json.loads((ROOT / accel["deepspeed_config"]["deepspeed_config_file"]).read_text())
        if ds["zero_optimization"]["stage"] == 3:
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (folder / f"{launch}.json").write_text(json.dumps(ds, indent=1))
        accel["deepspeed_config"]["deepspeed_config_file"] = str(folder / f"{launch}.json")
        out[launch] = folder / f"{launch}.yaml"
        out[launch].write_text(yaml.safe_dump(accel))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def case_commands(ctx: Context, case: Case) -> list[list[str]]:
    """The command lines of a case, run one after the other."""
    py = ctx.python
    if case.launch == "cli":
        source, out = ctx.run_dir(case.needs or ""), ctx.run_dir(case.name)
        return [
            [py, "-m", "scalelora.predict", "--adapter", str(source), "--input", str(ctx.work / "data" / "test.jsonl"),
             "--output", str(out / "predictions.jsonl")],
            [py, "-m", "scalelora.export", "--adapter", str(source), "--merge", "--out", str(out / "merged"),
             "--overwrite"],
        ]  # fmt: skip
    train = ["-m", "scalelora.train", "--config", "quickstart", *case_overrides(ctx, case)]
    if case.launch == "single":
        return [[py, *train]]
    config = ctx.work / "accel" / f"{case.launch}.yaml"
    launch = [py, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
              str(ctx.num_gpus), "--main_process_port", str(free_port())]  # fmt: skip
    return [[*launch, *train]]


# --- the dry run -----------------------------------------------------------------------------------


def table_problems() -> list[str]:
    """Mistakes in the case table itself: an unknown launch, model or check, a `needs` that is not an
    earlier case."""
    problems = []
    order = [case.name for case in CASES]
    for case in CASES:
        if case.launch not in ("single", "cli", *ACCEL_CONFIGS):
            problems.append(f"{case.name}: unknown launch {case.launch}")
        if case.model not in ("llama", "minilm"):
            problems.append(f"{case.name}: unknown model {case.model}")
        if case.needs and (case.needs not in BY_NAME or order.index(case.needs) > order.index(case.name)):
            problems.append(f"{case.name}: needs {case.needs}, which is not an earlier case")
        for check in case.checks:
            if check.split(":")[0] not in CHECKS:
                problems.append(f"{case.name}: unknown check {check}")
        if case.launch == "cli" and not case.needs:
            problems.append(f"{case.name}: a cli case needs a run to work on")
    return problems


def dry_run(ctx: Context, cases: list[Case]) -> int:
    """Resolve every case's config with scalelora's own loader and build its command; check the table,
    the DeepSpeed configs and the carry size. Runs nothing; returns the exit code."""
    import importlib.util

    from scalelora.config import load_config
    from scalelora.errors import ConfigError

    problems = table_problems()
    configs = deepspeed_configs(ctx.work / "accel")
    for launch in configs:
        ds = json.loads((ctx.work / "accel" / f"{launch}.json").read_text())
        zero = ds["zero_optimization"]
        if zero["stage"] == 3 and zero.get("stage3_param_persistence_threshold") != 0:
            problems.append(f"{launch}: stage3_param_persistence_threshold is not 0")
    for module in ("scalelora.train", "scalelora.predict", "scalelora.export", "accelerate.commands.launch"):
        # the top package's folder, not find_spec(module), which would import the package (torch and all)
        top, _, rest = module.partition(".")
        spec = importlib.util.find_spec(top)
        folder = Path(spec.origin).parent if spec and spec.origin else None
        if folder is None or not (folder / (rest.replace(".", "/") + ".py")).is_file():
            problems.append(f"{module} cannot be imported")
    for case in cases:
        for command in case_commands(ctx, case):
            print(f"{case.name}: {shlex.join(command)}")
        if case.launch == "cli":
            continue
        try:
            cfg = load_config("quickstart", case_overrides(ctx, case))
        except ConfigError as err:
            problems.append(f"{case.name}: {err}")
            continue
        if cfg.lora.r != LORA_R or cfg.train.precision != case.precision:
            problems.append(
                f"{case.name}: resolved lora.r={cfg.lora.r}, train.precision={cfg.train.precision}"
            )
        if Path(cfg.output_dir or "") != ctx.run_dir(case.name):
            problems.append(f"{case.name}: resolved output_dir {cfg.output_dir}")
    try:
        budget = carry_budget()
        print(
            f"gpu_check: carry {budget['total_mib']} MiB of {CARRY_LIMIT_MIB} "
            f"({', '.join(f'{k} {v / 2**20:.1f}' for k, v in budget['bytes'].items())} MiB; "
            f"wheels: {' '.join(budget['wheels'])})"
        )
        if not budget["ok"]:
            problems.append(
                f"the repository and the carry are {budget['total_mib']} MiB, over {CARRY_LIMIT_MIB}"
            )
    except (OSError, KeyError, ValueError, subprocess.CalledProcessError) as err:
        problems.append(f"carry size: {type(err).__name__}: {err}")
    for problem in problems:
        print(f"gpu_check: dry run: {problem}", file=sys.stderr)
    print(f"gpu_check: dry run {'FAILED' if problems else 'ok'}: {len(cases)} cases resolved")
    return 1 if problems else 0


# --- what the machine has ---------------------------------------------------------------------------

PROBE = r"""
import importlib.metadata as md, json, platform, re, sys
from pathlib import Path
out = {"python": platform.python_version(), "executable": sys.executable}
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
installed = {}
for dist in md.distributions():
    name = dist.metadata["Name"]
    if name and norm(name) not in installed:  # first on sys.path wins, as for imports
        installed[norm(name)] = dist.version
out["all_packages"] = dict(sorted(installed.items()))
out["packages"] = {n: installed.get(norm(n)) for n in json.loads(sys.argv[1])}
import torch
out["torch_cuda"] = torch.version.cuda
out["cuda_available"] = torch.cuda.is_available()
if out["cuda_available"]:
    props = torch.cuda.get_device_properties(0)
    out["gpu"] = {"name": props.name, "count": torch.cuda.device_count(),
                  "memory_gb": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}"}
    out["cudnn"] = torch.backends.cudnn.version()
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as err:
        out["nccl"] = f"unavailable: {err}"
# requirements the installed set does not meet: scalelora's own (pyproject floors) and the carried wheels'
from packaging.requirements import Requirement
unmet, below_floor = [], {}
try:
    import tomllib
    project = tomllib.loads(Path(sys.argv[2]).read_text())["project"]
    floors = project["dependencies"] + project["optional-dependencies"]["deepspeed"] + project["optional-dependencies"]["bnb"]
except Exception:
    floors = []
for line in floors:
    req = Requirement(line)
    have = installed.get(norm(req.name))
    if have is None or not req.specifier.contains(have, prereleases=True):
        below_floor[req.name] = {"installed": have, "required": str(req.specifier)}
for name in json.loads(sys.argv[3]):
    try:
        requires = md.requires(name) or []
    except md.PackageNotFoundError:
        unmet.append(f"{name}: not installed")
        continue
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        have = installed.get(norm(req.name))
        if have is None or not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{name} {installed.get(norm(name))} needs {req.name}{req.specifier} (installed: {have})")
out["below_floor"], out["requirements_unmet"] = below_floor, unmet
print(json.dumps(out))
"""


def carried_wheels(carry: Path) -> list[dict[str, str]]:
    return [
        {
            "name": w.name.split("-")[0].replace("_", "-").lower(),
            "version": w.name.split("-")[1],
            "file": w.name,
        }
        for w in sorted(carry.glob("*.whl"))
    ]


def install_wheels(ctx: Context, site: Path) -> list[str]:
    """pip install the carried wheels into `site` (--no-index --no-deps --target: nothing goes into the
    image's own site-packages) unless it holds this very set already (a rerun on the same machine), and put
    `site` after src/ on the path of this process and of every case. Returns the wheels' file names."""
    wheels = sorted(ctx.carry.glob("*.whl"))
    if not wheels:
        return []
    wanted = "".join(f"{w.name} {w.stat().st_size}\n" for w in wheels)
    stamp = site / ".gpu_check_wheels"
    if not (stamp.is_file() and stamp.read_text() == wanted):
        print(f"gpu_check: installing {len(wheels)} carried wheels into {site}", flush=True)
        subprocess.run(
            [ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
             "--upgrade", "--target", str(site), *map(str, wheels)],
            check=True,
        )  # fmt: skip
        stamp.write_text(wanted)
    src = str(ROOT / "src")
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in (src, str(site))]
    os.environ["PYTHONPATH"] = os.pathsep.join([src, str(site), *rest])
    sys.path[1:1] = [str(site)]
    return [w.name for w in wheels]


def probe(ctx: Context) -> dict[str, Any]:
    """What the machine and its Python hold, read in a child process (so this one never opens CUDA)."""
    carried = [w["name"] for w in carried_wheels(ctx.carry)]
    done = subprocess.run(
        [
            ctx.python,
            "-c",
            PROBE,
            json.dumps(KEY_PACKAGES),
            str(ROOT / "pyproject.toml"),
            json.dumps(carried),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the probe of {ctx.python} failed: {done.stderr.strip()[-2000:]}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["driver"] = (
            smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        )
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    return info


def machine() -> dict[str, Any]:
    memory = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "memory_gb": memory,
        "machine": platform.machine(),
    }


def commit() -> str | None:
    """The checkout's commit (+ `-dirty`), or GPU_CHECK_COMMIT where the copy carries no .git."""
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "-uno"], capture_output=True, text=True
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return None


# --- set-up ----------------------------------------------------------------------------------------

POSITIVE = ["great", "wonderful", "superb", "lovely", "brilliant", "moving", "charming", "delightful"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "weak", "tedious", "bland", "messy"]
FILLER = ["the", "film", "movie", "plot", "was", "really", "quite", "story", "acting", "a", "and", "ending"]


def build_inputs(work: Path, geometry: str) -> None:
    """The random base model (with a word-level tokenizer), a random teacher classifier of the same
    tokenizer, and a learnable 2-class dataset, under `work` (kept when already there)."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaModel, PreTrainedTokenizerFast

    shape = dict(GEOMETRY[geometry])
    teacher_layers, rows = shape.pop("teacher_layers"), shape.pop("rows")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + POSITIVE + NEGATIVE + FILLER)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        eos_token="[SEP]", bos_token="[CLS]",
    )  # fmt: skip
    config = dict(
        vocab_size=len(vocab), max_position_embeddings=2048, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        tie_word_embeddings=True, **shape,
    )  # fmt: skip
    model_dir, teacher_dir = work / "model", work / "teacher"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        LlamaModel(LlamaConfig(**config)).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    if not (teacher_dir / "config.json").is_file():
        torch.manual_seed(1)
        teacher = LlamaForSequenceClassification(
            LlamaConfig(**{**config, "num_hidden_layers": teacher_layers}, num_labels=2,
                        id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
        )  # fmt: skip
        with torch.no_grad():
            teacher.score.weight.mul_(20.0)  # confident, distinct logits, so the KD term is not ~0
        teacher.save_pretrained(teacher_dir)
        tokenizer.save_pretrained(teacher_dir)
    rng = random.Random(0)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, n in rows.items():
        lines = []
        for i in range(n):
            label = "pos" if i % 2 == 0 else "neg"
            words = [rng.choice(FILLER) for _ in range(rng.randint(8, 40))]
            for _ in range(rng.randint(1, 3)):
                words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
            lines.append(json.dumps({"text": " ".join(words), "label": label}) + "\n")
        (data / f"{split}.jsonl").write_text("".join(lines))
    (data / "labels.json").write_text(json.dumps(["neg", "pos"]))


# --- checks ----------------------------------------------------------------------------------------


def reload_matches(run: Path, base: Path, tolerance: float = 1e-3) -> float:
    """Reload the run's adapter on its base with plain transformers + PEFT (on the CPU), apply the
    run's stored calibration (calibration.json: the fitted temperature, as the run's sample predictions
    have it) and compare with summary.json's sample predictions: the same labels, and probabilities within
    `tolerance`. Returns the largest difference; raises CheckFailed."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from scalelora.calibration import Calibration, read_calibration

    summary = json.loads((run / "summary.json").read_text())
    adapter = run / "adapter"
    labels = summary["labels"]
    if summary.get("problem_type", "single_label") != "single_label":
        raise CheckFailed("the reload check compares single-label runs only")
    meta = json.loads((adapter / "scalelora.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = PeftModel.from_pretrained(model, adapter).eval()
    rows = summary["sample_predictions"]
    if not rows:
        raise CheckFailed("summary.json has no sample predictions to compare")
    encoded = tokenizer(
        [r["text"] for r in rows],
        padding=True,
        truncation=True,
        max_length=meta["max_length"],
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**encoded).logits.float().numpy()
    rule = read_calibration(adapter, labels) or Calibration("single_label", labels)
    probs, decided = rule.probabilities(logits), np.asarray(rule.decide(logits))
    worst = 0.0
    for i, row in enumerate(rows):
        predicted = labels[int(decided[i])]
        if predicted != row["after"]:
            raise CheckFailed(f"reloaded adapter predicts {predicted} for sample {i}, the run {row['after']}")
        worst = max(worst, abs(float(probs[i, labels.index(predicted)]) - row["after_confidence"]))
    if worst > tolerance:
        raise CheckFailed(
            f"reloaded adapter's probabilities differ from the run's by {worst:.2e} (> {tolerance:g})"
        )
    return worst


def adapter_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    one = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    if one.keys() != two.keys():
        raise CheckFailed(f"the adapters hold different tensors ({sorted(one.keys() ^ two.keys())[:3]})")
    return max(float((one[k].float() - two[k].float()).abs().max()) for k in one)


def check_predict_export(ctx: Context, case: Case, source: str) -> str:
    out = ctx.run_dir(case.name)
    summary = json.loads((ctx.run_dir(source) / "summary.json").read_text())
    gold = [json.loads(line)["label"] for line in (ctx.work / "data" / "test.jsonl").read_text().splitlines()]
    predicted = [json.loads(line)["label"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    if len(predicted) != len(gold):
        raise CheckFailed(f"predict wrote {len(predicted)} rows for {len(gold)} texts")
    accuracy = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
    trained = summary["eval"]["test"]["accuracy"]
    if abs(accuracy - trained) > 0.02:
        raise CheckFailed(f"predict's test accuracy {accuracy:.3f} is not the run's {trained:.3f}")
    if not (out / "merged" / "config.json").is_file():
        raise CheckFailed("export wrote no merged model")
    return f"predict test acc={accuracy:.3f} (run {trained:.3f}); merged model written"


def check_case(ctx: Context, case: Case, row: Row) -> None:
    """Read a finished case's outputs into `row`; raise CheckFailed when one is wrong. Every training
    case: summary.json, the GPU was used (a peak of GPU memory), every step ran, the adapter is complete
    (every LoRA tensor non-empty with rank LORA_R), the precision and DeepSpeed stage are the case's."""
    from scalelora.checkpoint import check_adapter_weights

    notes = []
    if case.launch == "cli":
        row.note = check_predict_export(ctx, case, case.needs or "")
        return
    run = ctx.run_dir(case.name)
    if not (run / "summary.json").is_file():
        raise CheckFailed("no summary.json")
    summary = json.loads((run / "summary.json").read_text())
    steady = summary.get("steady_state") or {}
    row.samples_per_s = steady.get("samples_per_second")
    peak = (summary.get("peak_memory_gb") or {}).get("gpu")
    row.peak_gpu_gb = peak
    row.extra = {
        "global_step": summary.get("global_step"),
        "steady_state": steady or None,
        "samples_per_second_with_warmup": summary.get("samples_per_second"),
        "phase_seconds": summary.get("phase_seconds"),
        "deepspeed": summary.get("deepspeed"),
        "nonfinite_skipped": summary.get("nonfinite_skipped"),
        "eval": summary.get("eval"),
        "versions": summary.get("versions"),
    }
    if not ctx.smoke and not peak:
        raise CheckFailed("no GPU memory was used: the run did not train on CUDA")
    if summary["global_step"] != summary["total_steps"]:
        raise CheckFailed(f"stopped at step {summary['global_step']} of {summary['total_steps']}")
    check_adapter_weights(run / "adapter", LORA_R)
    if summary.get("precision") != case.precision:
        raise CheckFailed(f"ran with precision {summary.get('precision')}, not {case.precision}")
    if case.launch in ACCEL_CONFIGS:
        ds = summary.get("deepspeed") or {}
        stage = 2 if case.launch == "zero2" else 3
        if ds.get("zero_stage") != stage:
            raise CheckFailed(f"ran with ZeRO stage {ds.get('zero_stage')}, not {stage}")
        if case.launch == "zero3_offload" and ds.get("offload_optimizer") != "cpu":
            raise CheckFailed(f"optimizer offload is {ds.get('offload_optimizer')}, not cpu")
        notes.append(f"zero{stage}")
    accuracy = summary["eval"]["validation"]["accuracy"]
    notes.insert(0, f"acc={accuracy:.3f}")
    if summary.get("nonfinite_skipped"):
        notes.append(f"{summary['nonfinite_skipped']} non-finite steps skipped")
    for check in case.checks:
        kind, _, arg = check.partition(":")
        if kind == "reload":
            notes.append(f"reload max |dp|={reload_matches(run, model_and_data(ctx, case)[0]):.1e}")
        elif kind == "same_adapter_as":
            diff = adapter_difference(ctx.run_dir(arg), run)
            if diff > 1e-3:
                raise CheckFailed(f"the adapter differs from {arg}'s by {diff:.2e} (> 1e-3)")
            notes.append(f"vs {arg} max diff {diff:.1e}")
        elif kind == "min_accuracy":
            if accuracy < float(arg):
                raise CheckFailed(f"validation accuracy {accuracy:.3f} < {arg}")
        elif kind == "distilled":
            distill = summary.get("distill") or {}
            if distill.get("teacher") != str(ctx.work / "teacher"):
                raise CheckFailed(f"summary.json names teacher {distill.get('teacher')}")
            notes.append("KD from model teacher")
        elif kind == "peak_below":
            other = ctx.run_dir(arg) / "summary.json"
            if not other.is_file():
                notes.append(f"no {arg} run to compare peaks with")
            elif ctx.smoke:
                notes.append("peaks not compared on the CPU")
            else:
                theirs = json.loads(other.read_text())["peak_memory_gb"]["gpu"]
                if not peak < 0.95 * theirs:
                    raise CheckFailed(f"peak {peak:.2f} GB is not below {arg}'s {theirs:.2f} GB")
                notes.append(f"peak {peak / theirs:.2f}x {arg}'s")
        elif kind == "compiled":
            if summary.get("compiled") is not True:
                raise CheckFailed("summary.json says the model was not compiled")
            notes.append("compiled")
    row.note = "; ".join(notes)


# --- running ---------------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (read from /proc): torchrun starts its workers in sessions of their own,
    so they are not in the launcher's process group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_child(proc: subprocess.Popen) -> None:
    """End a case's processes: its process group and every process below it (accelerate launch's workers,
    which would otherwise keep their GPU memory), TERM first, then KILL."""
    family = descendants(proc.pid)
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for pid in family:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        end = time.monotonic() + grace
        while time.monotonic() < end:
            if proc.poll() is not None and not any(alive(pid) for pid in family):
                return
            time.sleep(0.2)
    proc.poll()


def prepare_run_dir(ctx: Context, case: Case) -> None:
    out = ctx.run_dir(case.name)
    if out.exists():
        shutil.rmtree(out)
    if case.launch != "cli" and case.needs:
        # continue the needed run from its middle checkpoint: its later state is removed
        shutil.copytree(ctx.run_dir(case.needs), out)
        for later in (f"checkpoints/step-{ctx.steps}", "adapter", "summary.json"):
            path = out / later
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_case(ctx: Context, case: Case, timeout: float) -> Row:
    row = Row(case.name, case.why)
    log = ctx.work / "logs" / f"{case.name}.log"
    row.log = f"logs/{log.name}"
    commands = case_commands(ctx, case)
    row.command = " && ".join(shlex.join(c) for c in commands)
    started = time.monotonic()
    prepare_run_dir(ctx, case)
    with log.open("w") as handle:
        for command in commands:
            handle.write(f"$ {shlex.join(command)}\n")
            handle.flush()
            ctx.child = subprocess.Popen(
                command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
            )
            left = timeout - (time.monotonic() - started)
            try:
                row.exit_code = ctx.child.wait(max(left, 1))
            except subprocess.TimeoutExpired:
                stop_child(ctx.child)
                row.result, row.note = "timeout", f"killed after {timeout:.0f} s"
                break
            finally:
                ctx.child = None
            if row.exit_code != 0:
                break
    row.seconds = round(time.monotonic() - started, 1)
    if row.result == "timeout":
        return row
    try:
        if row.exit_code != 0:
            raise CheckFailed(f"exit code {row.exit_code}: {last_error(log)}")
        check_case(ctx, case, row)
        row.result = "ok"
    except Exception as err:  # every case gets its row, whatever failed
        row.result = "failed"
        row.note = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    return row


def last_error(log: Path) -> str:
    """The line of a failed case's log that says why: the last exception raised in a worker (torchrun's
    own ChildFailedError summary after it says nothing), else the last line naming an error."""
    lines = [
        re.sub(r"^\[rank\d+\]:\s*", "", line).strip() for line in log.read_text(errors="replace").splitlines()
    ]
    lines = [line for line in lines if line]
    raised = [line for line in lines if re.match(r"[\w.]*(Error|Exception|Halted)\b:", line)]
    raised = [line for line in raised if "ChildFailedError" not in line]
    errors = [line for line in lines if "error" in line.lower() or "exception" in line.lower()]
    return (raised or errors or lines or ["(empty log)"])[-1][:240]


def write_outputs(ctx: Context, report: dict[str, Any]) -> None:
    """The JSON report and the archive of logs (and each run's summary.json and metrics.jsonl) in --out,
    rewritten after every case, so a run cut off anywhere still leaves both."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    report["finished"] = now()
    tmp = ctx.out / f".{REPORT}.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(ctx.out / REPORT)
    members = sorted((ctx.work / "logs").glob("*.log"))
    for name in ("summary.json", "metrics.jsonl", "predictions.jsonl"):
        members += sorted((ctx.work / "runs").glob(f"*/{name}"))
    for keep_lines in (None, 3000, 300):
        tmp = ctx.out / f".{LOGS}.tmp"
        with tarfile.open(tmp, "w:gz") as archive:
            for path in members:
                arcname = f"gpu_check_logs/{path.relative_to(ctx.work)}"
                if keep_lines and path.suffix == ".log":
                    lines = path.read_text(errors="replace").splitlines(keepends=True)[-keep_lines:]
                    data = "".join(lines).encode()
                    info = tarfile.TarInfo(arcname)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
                else:
                    archive.add(path, arcname)
        if tmp.stat().st_size <= LOGS_LIMIT:
            break
    tmp.replace(ctx.out / LOGS)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan(ctx: Context, chosen: list[Case]) -> list[Case]:
    """`chosen`, with each run a case starts from put in before it when that run is not there (a fresh
    machine after a rerun with --only)."""
    names = {case.name for case in chosen}
    for case in chosen:
        if (
            case.needs
            and case.needs not in names
            and not (ctx.run_dir(case.needs) / "summary.json").is_file()
        ):
            names.add(case.needs)
    return [case for case in CASES if case.name in names]


def run_all(ctx: Context, cases: list[Case], report: dict[str, Any]) -> int:
    rows: dict[str, Row] = {}
    report["cases"] = []
    print(TABLE_HEAD, flush=True)
    for case in cases:
        row = Row(case.name, case.why)
        left = ctx.deadline - time.time()
        needed = rows.get(case.needs or "")
        if case.needs and needed is not None and needed.result != "ok":
            row.result, row.note = "skipped", f"needs {case.needs}, which did not pass"
        elif case.model == "minilm" and not (ctx.smoke or model_and_data(ctx, case)[0].is_dir()):
            row.result, row.note = (
                "skipped",
                f"no carried model in {ctx.carry}/models (scripts/fetch_gpu_wheels.sh)",
            )
        elif left < case.expect:
            row.note = f"time budget: expects ~{case.expect} s, {max(left, 0):.0f} s left"
        else:
            row = run_case(ctx, case, min(case.timeout, left))
        rows[case.name] = row
        print(row.line(), flush=True)
        report["cases"].append(asdict(row))
        rest = [r.name for r in rows.values() if r.result != "ok"]
        report["rerun"] = f"scripts/gpu_check.sh --only {','.join(rest)}" if rest else None
        report["status"] = "running"
        write_outputs(ctx, report)
    ran = [r for r in rows.values() if r.result != "not_run"]
    report["status"] = (
        "passed"
        if all(r.result == "ok" for r in rows.values())
        else ("failed" if any(r.result in ("failed", "timeout") for r in ran) else "incomplete")
    )
    write_outputs(ctx, report)
    print(
        f"gpu_check: {report['status']}: "
        + ", ".join(
            f"{sum(r.result == k for r in rows.values())} {k}"
            for k in ("ok", "failed", "timeout", "skipped", "not_run")
        )
        + f"; report {ctx.out / REPORT}, logs {ctx.out / LOGS}"
        + (f"; rerun the rest with: {report['rerun']}" if report.get("rerun") else ""),
        flush=True,
    )
    return 0 if report["status"] == "passed" else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", help="comma-separated cases (default: all; env CASES)", default=env.get("CASES")
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve every case's config and command, check the carry size, run nothing",
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument(
        "--budget",
        type=float,
        default=float(env.get("BUDGET", 330)),
        help="seconds for the whole check, counted from the start of gpu_check.sh (default 330)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=int(env.get("STEPS", STEPS)),
        help=f"optimizer steps per case (default {STEPS})",
    )
    parser.add_argument("--work", type=Path, default=Path(env.get("WORK", "/tmp/scalelora-gpu-check")))
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where the report and the logs go (default: $OUT, else WORK/out)",
    )
    parser.add_argument(
        "--carry",
        type=Path,
        default=Path(env.get("CARRY_DIR", ROOT / ".whl")),
        help="the carried wheels, model and data (default .whl)",
    )
    parser.add_argument(
        "--site",
        type=Path,
        default=Path(env.get("SITE", "/tmp/site")),
        help="where the carried wheels are installed (default /tmp/site)",
    )
    parser.add_argument("--num-gpus", type=int, default=int(env["NUM_GPUS"]) if env.get("NUM_GPUS") else None)
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="for the test suite: run on the CPU with a tiny model (the report says so; it verifies nothing about GPUs)",
    )
    return parser.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for case in CASES:
            print(f"{case.name:15s} {case.launch:14s} ~{case.expect:>3d} s  {case.why}")
        return 0
    only = [name for name in (args.only or "").replace(",", " ").split() if name]
    try:
        chosen = select(only)
    except KeyError as err:
        print(f"gpu_check: {err.args[0]}", file=sys.stderr)
        return 2
    started = float(os.environ.get("GPU_CHECK_STARTED") or time.time())
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else args.work / "out")
    ctx = Context(
        work=args.work if not args.dry_run else Path(tempfile.mkdtemp(prefix="gpu-check-dry-")),
        out=out, carry=args.carry.resolve(), python=os.environ.get("PYTHON") or sys.executable,
        steps=args.steps, num_gpus=args.num_gpus or 1, budget=args.budget, started=started, smoke=args.cpu_smoke,
    )  # fmt: skip
    if args.dry_run:
        try:
            return dry_run(ctx, chosen)
        finally:
            shutil.rmtree(ctx.work, ignore_errors=True)
    (ctx.work / "logs").mkdir(parents=True, exist_ok=True)
    # checkpoint manifests are signed with this key: the check's own, not the user's
    os.environ.setdefault("SCALELORA_KEY_FILE", str(ctx.work / "checkpoint.key"))
    report: dict[str, Any] = {
        "report": "scalelora GPU check (scripts/gpu_check.sh)",
        "mode": "cpu-smoke" if ctx.smoke else "gpu",
        "status": "starting",
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        ),
        "command": shlex.join(["scripts/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])]),
        "commit": commit(),
        "machine": machine(),
        "settings": {"steps": ctx.steps, "budget_s": ctx.budget, "lora_r": LORA_R, "work": str(ctx.work)},
        "carried": {
            "wheels": carried_wheels(ctx.carry),
            "model": (ctx.carry / "models" / "minilm-l6-bf16").is_dir(),
        },
    }

    # a signal from outside (a device command's time limit) still leaves a report and stops the case's processes
    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    try:
        if not ctx.smoke:
            install_wheels(ctx, args.site)
        info = probe(ctx)
        report.update(
            {k: info.get(k) for k in ("python", "executable", "torch_cuda", "cudnn", "nccl", "driver")}
        )
        report.update(
            {k: info.get(k) for k in ("gpu", "packages", "below_floor", "requirements_unmet", "all_packages")}
        )
        print(f"gpu_check: {report['started']} on {(info.get('gpu') or {}).get('name', 'no GPU')}; "
              + ", ".join(f"{k} {v or 'MISSING'}" for k, v in info["packages"].items() if k in KEY_PACKAGES[:8]), flush=True)  # fmt: skip
        for line in info["requirements_unmet"]:
            print(f"gpu_check: warning: {line}", flush=True)
        if not info["cuda_available"] and not ctx.smoke:
            report["status"] = "no_cuda"
            write_outputs(ctx, report)
            print(f"gpu_check: torch {info['packages'].get('torch')} sees no CUDA device: this check runs on a GPU "
                  "only (the CPU half is the test suite)", file=sys.stderr)  # fmt: skip
            return 2
        ctx.num_gpus = args.num_gpus or (info.get("gpu") or {}).get("count") or 1
        report["settings"]["num_gpus"] = ctx.num_gpus
        cases = plan(ctx, chosen)
        begun = time.monotonic()
        build_inputs(ctx.work, "tiny" if ctx.smoke else "full")
        deepspeed_configs(ctx.work / "accel")
        report["settings"]["setup_seconds"] = round(time.monotonic() - begun, 1)
        print(f"gpu_check: model, teacher and data ready in {report['settings']['setup_seconds']} s; "
              f"{len(cases)} cases, budget {ctx.budget:.0f} s ({ctx.deadline - time.time():.0f} s left)", flush=True)  # fmt: skip
        return run_all(ctx, cases, report)
    except KeyboardInterrupt as stop:
        if ctx.child is not None:
            stop_child(ctx.child)
        report["status"] = f"interrupted ({stop})"
        write_outputs(ctx, report)
        return 130
    except Exception as err:
        report["status"] = f"error: {type(err).__name__}: {err}"
        write_outputs(ctx, report)
        raise


if __name__ == "__main__":
    sys.exit(main())
