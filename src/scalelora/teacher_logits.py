"""`python -m scalelora.teacher_logits --teacher PATH --config RECIPE --out DIR [key=value ...]`.

Computes a frozen teacher's logits for every training example once, so students can distil from
them (`distill.teacher=cache distill.cache_dir=DIR`) without holding the teacher in memory or
re-running it every epoch. Also runs under `accelerate launch` with several processes.

The teacher is loaded and run as the student's config says: `model.dtype`, `model.attn_implementation`
(passed to from_pretrained) and `train.precision` (the forward under that autocast; `auto` resolved for
this device as training resolves it, and logged). The same overrides the student uses give the same
settings; `train.precision=no` computes the logits in float32 anywhere.

Layout of DIR:
- `manifest.json`: format version, teacher identity (path + a hash of its config, weights and
  calibration.json), label order, problem type, max_length, how long texts were scored (`long_text`:
  `longtext.LongText.record()`, the data.long_text mode, data.clean_html and the mode's keys; a cache
  without it truncated), the precision the logits were computed in
  (`precision`: no, bf16 or fp16; a cache without it is float32), whether the logits are calibrated
  (`logits_calibrated`: always false, the shards hold raw logits) and the teacher's fitted
  temperature (`teacher_temperature`, null when it has none), and per split the data fingerprint,
  number of examples, shard files and whether the build is complete.
- `train-00000.safetensors`, ...: shard k holds the rows at positions [k*S, (k+1)*S) of the split,
  as `idx` (the example id the trainer looks up) and `logits` (float32): one row per document, under
  data.long_text=chunk its windows' logits pooled as the student pools its own (data.chunk_pool).

Every shard is written to a temporary name and renamed, so a shard on disk is always complete; an
interrupted build rerun with the same arguments keeps the finished shards and computes the rest.
With N processes, rank r computes the shards k with k % N == r: every example is computed and
written exactly once (no padding duplicates as with an evenly split data loader).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from scalelora.config import ModelConfig, RunConfig, load_config
from scalelora.errors import ConfigError, DataError, UserError, exit_on_user_error
from scalelora.files import atomic_write_json
from scalelora.longtext import BEFORE, LongText, document_logits
from scalelora.runtime import autocast, decide_on_main, resolve_precision

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def teacher_identity(name: str) -> dict[str, Any]:
    """Path and a content hash of the teacher (config + weight files), so a retrained teacher is noticed."""
    from scalelora.models import resolve_model_path

    path = Path(str(resolve_model_path(name)))
    digest = hashlib.sha256()
    if path.is_dir():
        # calibration.json too: a recalibrated teacher records another temperature in the cache
        files = (
            sorted(path.glob("config.json"))
            + sorted(path.glob("*.safetensors"))
            + sorted(path.glob("calibration.json"))
        )
        for file in files:
            digest.update(file.name.encode())
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
    else:
        digest.update(name.encode())  # a hub name: the name (and revision) is the identity
    return {
        "name": name,
        "path": str(path.resolve()) if path.exists() else name,
        "hash": digest.hexdigest()[:16],
    }


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.safetensors"


def check_compatible(existing: dict[str, Any], expected: dict[str, Any], out: Path) -> None:
    """Raise DataError when a cache on disk was built from another teacher, data or label order."""
    problems = []
    for key in ("format", "teacher", "label_names", "max_length"):
        if existing.get(key) != expected.get(key):
            problems.append(f"{key}: on disk {existing.get(key)!r}, now {expected.get(key)!r}")
    if existing.get("long_text", BEFORE) != expected.get("long_text", BEFORE):
        problems.append(
            f"long_text: on disk {existing.get('long_text', BEFORE)!r}, now {expected['long_text']!r}"
        )
    # a cache written before the key was recorded was computed in float32
    if existing.get("precision", "no") != expected.get("precision", "no"):
        problems.append(
            f"precision: on disk {existing.get('precision', 'no')!r}, now {expected.get('precision', 'no')!r}"
        )
    for split, info in expected["splits"].items():
        old = existing.get("splits", {}).get(split)
        if old is not None and old.get("fingerprint") != info["fingerprint"]:
            problems.append(
                f"splits.{split}.fingerprint: on disk {old.get('fingerprint')}, now {info['fingerprint']}"
            )
    if problems:
        raise DataError(
            f"teacher-logit cache {out} was built for something else ({'; '.join(problems)}); "
            "pass --overwrite to rebuild it, or another --out"
        )


@torch.inference_mode()
def shard_logits(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    pairs: list[str] | None,
    max_length: int,
    batch_size: int,
    device: torch.device,
    precision: str = "no",
    long_text: LongText | None = None,
) -> torch.Tensor:
    """Logits of the frozen teacher (eval mode, no grad, under the autocast of `precision`: no, bf16,
    fp16) for `texts`, in order, as float32; each text treated as `long_text` says (default: truncated at
    `max_length`), `batch_size` counting texts.

    Batches are made of texts of similar length (sorted by characters), so each is padded to little more
    than its own length; the rows are put back in `texts`' order.
    """
    from scalelora.models import encode_batch

    if long_text is not None and (long_text.mode != "truncate" or long_text.clean_html):
        return document_logits(
            model, tokenizer, texts, long_text, batch_size, device, pairs, lambda: autocast(precision, device)
        )
    sizes = [len(t) + (len(pairs[i]) if pairs is not None else 0) for i, t in enumerate(texts)]
    order = sorted(range(len(texts)), key=sizes.__getitem__)
    out = []
    with torch.inference_mode(), autocast(precision, device):
        for start in range(0, len(texts), batch_size):
            chunk = order[start : start + batch_size]
            encoded = encode_batch(
                tokenizer,
                [texts[i] for i in chunk],
                [pairs[i] for i in chunk] if pairs is not None else None,
                max_length,
                lambda i, chunk=chunk: f"text {chunk[i]} of the shard",
            )
            out.append(model(**{k: v.to(device) for k, v in encoded.items()}).logits.float().cpu())
    by_length = torch.cat(out)
    restored = torch.empty_like(by_length)
    restored[torch.tensor(order)] = by_length  # row order[j] of `texts` is row j of `by_length`
    return restored


def process_state() -> Any:
    """Accelerate's PartialState for this build: one process, or one of those `accelerate launch` started."""
    from accelerate import PartialState

    no_cuda = not torch.cuda.is_available()
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # as runtime.build_accelerator: torchrun-launched CPU processes need cpu=True and gloo, or each
    # process silently believes it is alone (and all of them would compute every shard)
    return PartialState(cpu=no_cuda, **({"backend": "gloo"} if no_cuda and multi else {}))


def load_frozen_teacher(
    cfg: RunConfig, teacher: str, label_names: list[str], problem_type: str, device: torch.device
) -> tuple[torch.nn.Module, Any, float | None]:
    """The teacher in eval mode without gradients, its tokenizer, and its fitted temperature (None: none).

    Raises UserError when the teacher has no trained head for `label_names`.
    """
    from scalelora.models import load_classifier, load_tokenizer
    from scalelora.teacher import model_folder_facts

    teacher_cfg = ModelConfig(
        name=teacher,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle=cfg.model.allow_pickle,
        attn_implementation=cfg.model.attn_implementation,
    )
    tokenizer = load_tokenizer(teacher_cfg, cfg.data.truncation_side)
    model, new_modules = load_classifier(
        teacher_cfg, label_names, problem_type=problem_type, pad_token_id=tokenizer.pad_token_id
    )
    if new_modules:
        raise UserError(
            f"--teacher {teacher} has no trained classification head for labels {label_names} "
            f"(newly initialised: {', '.join(new_modules)}); train a teacher with model.mode=full first"
        )
    model = model.to(device).eval().requires_grad_(False)
    _, temperature = model_folder_facts(teacher, label_names)
    return model, tokenizer, temperature


def expected_manifest(
    cfg: RunConfig,
    teacher: str,
    loaded: Any,
    datasets_by_split: dict[str, Any],
    splits: tuple[str, ...],
    shard_size: int,
    temperature: float | None,
    precision: str = "no",
) -> dict[str, Any]:
    """The manifest this build writes (every split still incomplete): what identifies the cache, and
    the shards each split is cut into. Raises UserError for a split the config has no data for."""
    expected: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "teacher": teacher_identity(teacher),
        "label_names": list(loaded.label_names),
        "problem_type": loaded.problem_type,
        "max_length": cfg.data.max_length,
        "long_text": LongText.from_config(cfg.data).record(),
        # the autocast the logits were computed under: a build is not finished in another one
        "precision": precision,
        # the shards hold the teacher's raw logits; a student with distill.calibrated_teacher=true
        # divides them by this temperature (from the teacher's calibration.json; null: none fitted)
        "logits_calibrated": False,
        "teacher_temperature": temperature,
        "splits": {},
    }
    for split in splits:
        ds = datasets_by_split.get(split)
        if ds is None:
            raise UserError(
                f"--splits names '{split}', which this config has no data for (train, eval, test)"
            )
        num_shards = max(1, -(-len(ds) // shard_size))
        expected["splits"][split] = {
            "fingerprint": loaded.fingerprints[split],
            "num_examples": len(ds),
            "shard_size": shard_size,
            "shards": [shard_name(split, k) for k in range(num_shards)],
            "complete": False,
        }
    return expected


def claim_cache_dir(out: Path, expected: dict[str, Any], shard_size: int, overwrite: bool) -> None:
    """Keep a cache on disk built for the same teacher and data (its finished shards are reused), or clear
    it with `overwrite`; then write the expected manifest, so the identity is recorded before any shard.

    Raises DataError for a cache built for something else or with another shard size (unless `overwrite`).
    """
    manifest_path = out / MANIFEST
    if manifest_path.is_file() and not overwrite:
        existing = json.loads(manifest_path.read_text())
        check_compatible(existing, expected, out)
        for split, info in existing.get("splits", {}).items():
            if split in expected["splits"] and info.get("shard_size") != shard_size:
                raise DataError(
                    f"teacher-logit cache {out} uses --shard-size {info.get('shard_size')}; "
                    "rerun with that size or pass --overwrite"
                )
    elif out.exists() and overwrite:
        for stale in list(out.glob("*.safetensors")) + [manifest_path]:
            if stale.exists():
                stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest_path, expected)


def compute_missing_shards(
    state: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    ds: Any,
    info: dict[str, Any],
    out: Path,
    max_length: int,
    batch_size: int,
    precision: str = "no",
    long_text: LongText | None = None,
) -> tuple[int, int]:
    """Compute and write this rank's shards of one split (shard k on rank k % N) that are not on disk
    yet, each to a temporary name and renamed. Returns (shards computed, shards kept from an earlier build)."""
    from safetensors.torch import save_file

    shard_size = info["shard_size"]
    done = computed = 0
    for k, name in enumerate(info["shards"]):
        if k % state.num_processes != state.process_index:
            continue
        path = out / name
        if path.is_file():
            done += 1
            continue  # finished by an earlier (interrupted) build
        rows = ds.select(range(k * shard_size, min(len(ds), (k + 1) * shard_size)))
        logits = shard_logits(
            model,
            tokenizer,
            list(rows["text"]),
            list(rows["text_pair"]) if "text_pair" in rows.column_names else None,
            max_length,
            batch_size,
            state.device,
            precision,
            long_text,
        )
        tmp = path.with_name(f".{name}.tmp")
        save_file({"idx": torch.tensor(rows["idx"], dtype=torch.long), "logits": logits}, str(tmp))
        os.replace(tmp, path)
        computed += 1
    return computed, done


def write_final_manifest(out: Path, expected: dict[str, Any]) -> None:
    """Mark each split complete when all its shards are on disk, and write the manifest."""
    for info in expected["splits"].values():
        info["complete"] = all((out / shard).is_file() for shard in info["shards"])
    atomic_write_json(out / MANIFEST, expected)


def build_cache(
    cfg: RunConfig,
    teacher: str,
    out: Path,
    splits: tuple[str, ...] = ("train",),
    shard_size: int = 2048,
    batch_size: int = 64,
    overwrite: bool = False,
    log: Any = None,
) -> dict[str, Any]:
    """Compute (or finish) the cache in `out`; returns the manifest. Collective under accelerate launch.

    Raises DataError for a cache built for other data / another teacher (unless `overwrite`), UserError
    when the teacher has no trained head for the data's labels, and ConfigError for fp16 without a GPU.
    """
    from scalelora import data as data_lib

    state = process_state()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True) if state.is_main_process else None)
    choice = resolve_precision(cfg.train.precision, cfg.model.dtype, state.device.type == "cuda")
    if choice.precision == "fp16" and state.device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a GPU; use train.precision=no (or bf16) on CPU")
    if choice.log_line():
        log(choice.log_line())
    loaded = data_lib.load_splits(cfg.data, cfg.seed)
    datasets_by_split = {"train": loaded.train, "eval": loaded.eval, "test": loaded.test}
    model, tokenizer, temperature = load_frozen_teacher(
        cfg, teacher, loaded.label_names, loaded.problem_type, state.device
    )
    expected = expected_manifest(
        cfg, teacher, loaded, datasets_by_split, splits, shard_size, temperature, choice.precision
    )
    decide_on_main(state, lambda: claim_cache_dir(out, expected, shard_size, overwrite))
    for split in splits:
        computed, done = compute_missing_shards(
            state,
            model,
            tokenizer,
            datasets_by_split[split],
            expected["splits"][split],
            out,
            cfg.data.max_length,
            batch_size,
            choice.precision,
            LongText.from_config(cfg.data),
        )
        print(
            f"scalelora: teacher_logits rank {state.process_index}: split {split}: {computed} shard(s) computed, "
            f"{done} kept from an earlier build",
            file=sys.stderr,
            flush=True,
        )
    state.wait_for_everyone()
    if state.is_main_process:
        write_final_manifest(out, expected)
        log(f"scalelora: teacher logits of {teacher} for {', '.join(splits)} -> {out}")
    state.wait_for_everyone()
    return expected


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scalelora.teacher_logits",
        description="Cache a frozen teacher's logits for the training data of a recipe (for distill.teacher=cache).",
    )
    parser.add_argument("--teacher", required=True, help="teacher model folder (e.g. RUN/model) or hub name")
    parser.add_argument(
        "--config", required=True, help="the student's recipe or YAML (its data section is used)"
    )
    parser.add_argument("--out", required=True, help="cache folder (distill.cache_dir of the student)")
    parser.add_argument(
        "--splits", default="train", help="comma-separated: train, eval, test (default train)"
    )
    parser.add_argument("--shard-size", type=int, default=2048, help="examples per shard file")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--overwrite", action="store_true", help="rebuild a cache made for other data or teacher"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="the same overrides the student uses"
    )
    return parser.parse_intermixed_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.shard_size < 1 or args.batch_size < 1:
        raise UserError("--shard-size and --batch-size must be positive")
    cfg = load_config(args.config, args.overrides)
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    build_cache(cfg, args.teacher, Path(args.out), splits, args.shard_size, args.batch_size, args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
