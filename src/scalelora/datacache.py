"""The data cache: label-encoded and tokenized splits as Arrow files on disk, built once per machine by its
local main process and memory-mapped by every process (`data.cache`; small data stays in memory).

Location: `data.cache_dir`, else `$SCALELORA_CACHE/data`, else `~/.cache/scalelora/data`:

    <root>/<folder name>-<hash of its path>/rows-<rows key>/{meta.json, train.arrow, eval.arrow, test.arrow}
                                           rows-<rows key>/lengths-<tokenizer>.npy   (the auto default's probe)
                                           rows-<rows key>/tokens-<tokens key>/{meta.json, train.arrow, ...}

The rows key covers the format (FORMAT), each split file's and labels.json's sha256, every `data.*` key but
those in NOT_IN_KEY and TOKEN_KEYS, and the seed when a subset is drawn; the tokens key covers the rows key,
the tokenizer (`tokens.tokenizer_fingerprint`) and TOKEN_KEYS. A key added to DataConfig is in both keys
unless listed here: a new setting that changes tokens but not rows is one line in TOKEN_KEYS, one that
changes neither is one line in NOT_IN_KEY. An edited file has another sha256, so another entry.

Eviction: after each run, a folder keeps its KEEP newest rows entries (by last use) and each of those its
KEEP newest tokens entries; older ones are deleted (a process still mapping one keeps reading it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from scalelora import longtext
from scalelora.errors import DataError, UserError, error_class
from scalelora.longtext import LongText

FORMAT = 1
"""Raise it when what an entry holds changes (a column, its type, meta.json)."""
DISK_MIN_BYTES = 32 << 20
"""`data.cache=auto`: local split files of at least this many bytes in all are cached on disk."""
KEEP = 2
NOT_IN_KEY = ("root", "num_workers", "group_by_length", "class_balanced", "cache", "cache_dir", "chunk_pool")
"""data.* keys that change neither the rows nor the tokens."""
TOKEN_KEYS = ("max_length", "truncation_side", *(key.split(".", 1)[1] for key in longtext.TOKEN_KEYS))
"""data.* keys that change the tokens, not the rows."""
WAIT_SECONDS = 0.2
LOCAL_SPLITS = ("train", "eval", "test")


def cache_root(data: Any) -> Path:
    from scalelora.models import cache_dir

    return Path(data.cache_dir).expanduser() if data.cache_dir else cache_dir() / "data"


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Plan:
    """Where a local folder's data is cached and under which keys."""

    data: Any
    seed: int
    folder: Path
    files: dict[str, Path]
    total_bytes: int

    @property
    def folder_dir(self) -> Path:
        return cache_root(self.data) / f"{self.folder.name}-{digest(str(self.folder))}"

    @functools.cached_property
    def rows_dir(self) -> Path:
        """The rows entry (hashing every split file on first use: about 1 s per GB)."""
        data = self.data
        labels_file = self.folder / "labels.json"
        settings = {
            f.name: getattr(data, f.name)
            for f in dataclasses.fields(data)
            if f.name not in NOT_IN_KEY + TOKEN_KEYS
        }
        key = {
            "format": FORMAT,
            "files": {split: file_sha256(path) for split, path in self.files.items()},
            "labels.json": file_sha256(labels_file) if labels_file.is_file() else None,
            "data": settings,
            # the seed draws max_train_samples / max_eval_samples subsets, and nothing else here
            "seed": self.seed if (data.max_train_samples or data.max_eval_samples) else None,
        }
        return self.folder_dir / f"rows-{digest(key)}"

    def tokens_dir(self, tokenizer: Any) -> Path:
        from scalelora import tokens

        settings = {key: getattr(self.data, key) for key in TOKEN_KEYS}
        key = digest(
            {"rows": self.rows_dir.name, "tokenizer": tokens.tokenizer_fingerprint(tokenizer), **settings}
        )
        return self.rows_dir / f"tokens-{key}"

    def lengths_file(self, tokenizer: Any, clean_html: bool = False) -> Path:
        """The auto default's length sample for this tokenizer (of the texts data.clean_html cleans)."""
        from scalelora import tokens

        cleaned = "-clean_html" if clean_html else ""
        return self.rows_dir / f"lengths-{tokens.tokenizer_fingerprint(tokenizer)}{cleaned}.npy"


def plan(data: Any, seed: int) -> Plan | None:
    """The cache plan for this data, or None when it stays in memory: `data.cache=never`, a hub dataset
    (`datasets` caches those itself), or `auto` with files under DISK_MIN_BYTES in all."""
    from scalelora import data as data_lib

    if data.cache == "never":
        return None
    folder = data_lib.resolve_local_folder(data)
    if folder is None:
        return None
    files = data_lib.local_files(data, folder)
    total = sum(path.stat().st_size for path in files.values())
    if data.cache == "auto" and total < DISK_MIN_BYTES:
        return None
    return Plan(data, seed, folder.resolve(), files, total)


# --- entries --------------------------------------------------------------------------------------


def ready(entry: Path) -> bool:
    return (entry / "meta.json").is_file()


def write_entry(
    target: Path, tables: dict[str, Iterable[pa.RecordBatch] | pa.Table], meta: dict[str, Any]
) -> None:
    """Write an entry atomically: into a temporary folder, renamed into place (a concurrent builder of the
    same entry, on another machine sharing the folder, loses the race and its copy is dropped)."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.mkdir(parents=True)
        for name, content in tables.items():
            batches = content.to_batches() if isinstance(content, pa.Table) else content
            schema = content.schema if isinstance(content, pa.Table) else None
            write_arrow(tmp / f"{name}.arrow", batches, schema)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(target)
        except OSError:
            if not ready(target):
                raise
    except OSError as err:
        raise DataError(
            f"cannot write the data cache in {target.parent} ({err.strerror or err}); set data.cache_dir to a "
            "writable folder, or data.cache=never to keep the data in memory"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_arrow(path: Path, batches: Iterable[pa.RecordBatch], schema: pa.Schema | None) -> None:
    writer = None
    with pa.OSFile(str(path), "wb") as sink:
        for batch in batches:
            if writer is None:
                writer = pa.ipc.new_file(sink, batch.schema)
            writer.write_batch(batch)
        if writer is None:
            writer = pa.ipc.new_file(sink, schema)
        writer.close()


def read_table(path: Path) -> pa.Table:
    """An Arrow file, memory-mapped: its pages are the page cache's, shared by every process."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def read_entry(entry: Path) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    meta = json.loads((entry / "meta.json").read_text())
    tables = {
        name: read_table(entry / f"{name}.arrow")
        for name in LOCAL_SPLITS
        if (entry / f"{name}.arrow").is_file()
    }
    return tables, meta


def touch(entry: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(entry / "meta.json")


def evict(parent: Path, prefix: str, keep: int = KEEP) -> list[Path]:
    """Delete all but the `keep` most recently used entries named `prefix`* under `parent`; returns them."""
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(prefix) and ready(p)]
    except OSError:
        return []
    entries.sort(key=lambda p: (p / "meta.json").stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return entries[keep:]


# --- one build per machine ------------------------------------------------------------------------


def on_each_machine(accelerator: Any, build: Callable[[], None], ready_paths: list[Path], nonce: str) -> None:
    """Collective: the local main process of each machine runs `build` (which makes `ready_paths`); the
    other processes wait for those paths (polling the file system, not a collective that a long build
    would time out), then every rank raises the first UserError a builder raised, as
    `runtime.check_on_each_node` does."""
    failed = ready_paths[0].parent / f".failed-{nonce}"
    error: tuple[str, str] | None = None
    if accelerator.is_local_main_process:
        try:
            build()
        except UserError as err:
            error = (type(err).__name__, str(err))
        except BaseException:
            mark(failed)  # a bug: its traceback propagates here, the launcher ends the others
            raise
        finally:
            if error is not None:
                mark(failed)
    else:
        while not all(p.exists() for p in ready_paths) and not failed.exists():
            time.sleep(WAIT_SECONDS)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        error = next((found for found in gather_object([error]) if found), None)
        if accelerator.is_local_main_process:
            failed.unlink(missing_ok=True)
    if error is not None:
        raise error_class(error[0])(error[1])


def mark(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def shared_nonce(accelerator: Any) -> str:
    """A token every rank of this run shares (names this run's failure markers)."""
    if accelerator.num_processes == 1:
        return secrets.token_hex(8)
    from scalelora.runtime import decide_on_main

    return decide_on_main(accelerator, lambda: secrets.token_hex(8))


# --- the two stages -------------------------------------------------------------------------------


def write_rows(entry: Path, splits: Any) -> None:
    from scalelora import data as data_lib

    meta = {
        "format": FORMAT,
        "label_names": splits.label_names,
        "source": splits.source,
        "fingerprints": splits.fingerprints,
        "dropped_empty": splits.dropped_empty,
        "problem_type": splits.problem_type,
        "files": splits.files,
    }
    write_entry(entry, {name: data_lib.arrow_table(ds) for name, ds in splits.named()}, meta)


def read_rows(entry: Path) -> Any:
    from scalelora import data as data_lib

    tables, meta = read_entry(entry)
    prints = meta["fingerprints"]
    return data_lib.Splits(
        meta["label_names"],
        data_lib.to_dataset(tables["train"], prints["train"]),
        data_lib.to_dataset(tables["eval"], prints["eval"]),
        data_lib.to_dataset(tables["test"], prints["test"]) if "test" in tables else None,
        meta["source"],
        fingerprints=prints,
        dropped_empty=meta["dropped_empty"],
        problem_type=meta["problem_type"],
        files=meta["files"],
    )


def write_tokens(
    entry: Path, splits: Any, tokenizer: Any, max_length: int, log: Any, long_text: Any = None
) -> None:
    """Tokenize each split straight into its Arrow file, batch by batch (never the whole split in memory);
    long documents as `long_text` (longtext.LongText) says."""
    from scalelora import data as data_lib
    from scalelora import tokens

    truncated: dict[str, int] = {}
    rows: dict[str, int] = {}
    streams = {}
    for name, ds in splits.named():
        table = data_lib.arrow_table(ds)
        rows[name] = table.num_rows

        def stream(name: str = name, table: pa.Table = table) -> Iterable[pa.RecordBatch]:
            truncated[name] = 0
            with data_lib.stage(log, f"tokenize {name}", total=table.num_rows) as done:
                for batch, cut in tokens.tokenize_batches(
                    table, tokenizer, max_length, done.advance, long_text
                ):
                    truncated[name] += cut
                    yield batch
                done(
                    f"{table.num_rows:,} rows, {truncated[name]:,} {longtext.cut_label(long_text)}, "
                    f"{tokens.parallelism_note()}"
                )
            if table.num_rows == 0:
                yield from data_lib.empty_tokens(table, tokenizer).to_batches()

        streams[name] = stream()
    meta: dict[str, Any] = {"format": FORMAT, "max_length": max_length, "rows": rows, "truncated": truncated}
    write_entry(entry, streams, meta)  # meta.json is written after the streams ran: `truncated` is filled


def read_tokens(entry: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from scalelora import data as data_lib

    tables, meta = read_entry(entry)
    return {name: data_lib.to_dataset(t, f"{entry.name}-{name}") for name, t in tables.items()}, meta


def write_lengths(path: Path, lengths: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as handle:
            np.save(handle, lengths)
        tmp.rename(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write the data cache in {path.parent} ({err.strerror or err})") from None


def size_of(entry: Path) -> int:
    return sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())


# --- a run's data through the cache ---------------------------------------------------------------


def load_cached(
    cfg: Any, tokenizer: Any, accelerator: Any, log: Any, choose: Any, plan: Any
) -> tuple[Any, dict[str, Any]]:
    """`load_data` through the on-disk cache: the local main process of each machine builds what is
    missing (rows, the auto default's length sample, tokens), the others wait, every process maps it."""
    from scalelora import data as data_lib

    nonce = shared_nonce(accelerator)
    with data_lib.stage(log, "look up the cache") as done:
        reused = ready(plan.rows_dir)
        done(f"{plan.rows_dir} ({'reused' if reused else 'to build'})")

    def build_rows() -> None:
        if not ready(plan.rows_dir):
            splits = data_lib.load_splits(cfg.data, cfg.seed, log)
            with data_lib.stage(log, "write the rows to the cache") as done:
                write_rows(plan.rows_dir, splits)
                done(f"{size_of(plan.rows_dir) / 2**20:,.0f} MiB")

    on_each_machine(accelerator, build_rows, [plan.rows_dir / "meta.json"], nonce)
    splits = read_rows(plan.rows_dir)
    if choose is not None:
        from scalelora import autoconfig

        sample = autoconfig.sample_table(splits.train)  # every process alike: the sample is seeded
        share = autoconfig.markup_share(sample)
        clean = autoconfig.reads_markup(cfg.data, cfg.explicit_keys, share)
        lengths_file = plan.lengths_file(tokenizer, clean)

        def build_lengths() -> None:
            if not lengths_file.exists():
                with data_lib.stage(log, "measure token lengths for the auto default"):
                    lengths = autoconfig.length_sample(sample, tokenizer, clean)
                write_lengths(lengths_file, lengths)

        on_each_machine(accelerator, build_lengths, [lengths_file], nonce)
        choose(splits, autoconfig.LengthSample(np.load(lengths_file), share))
    tokens_dir = plan.tokens_dir(tokenizer)

    def build_tokens() -> None:
        if not ready(tokens_dir):
            write_tokens(
                tokens_dir, splits, tokenizer, cfg.data.max_length, log, LongText.from_config(cfg.data)
            )
        elif log is not None:
            log(f"scalelora: data: tokens at data.max_length={cfg.data.max_length}: reused {tokens_dir.name}")

    on_each_machine(accelerator, build_tokens, [tokens_dir / "meta.json"], nonce)
    tokenized, meta = read_tokens(tokens_dir)
    for name, ds in splits.named():
        splits.truncated[data_lib.SPLIT_NAMES[name]] = data_lib.truncation_record(
            meta["truncated"][name], len(ds)
        )
    if accelerator.is_local_main_process:
        touch(plan.rows_dir)
        touch(tokens_dir)
        evicted = evict(plan.folder_dir, "rows-") + evict(plan.rows_dir, "tokens-")
        if log is not None and evicted:
            log(
                f"scalelora: data: cache: removed {len(evicted)} older entr{'y' if len(evicted) == 1 else 'ies'} of {plan.folder}"
            )
    for line in data_lib.truncation_lines(splits.truncated, cfg.data):
        if log is not None:
            log(line)
    return splits, tokenized
