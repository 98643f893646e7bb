"""Datasets: find and load splits, build and check the label map, tokenize once, batch by length,
and stream the training batches from any position.

Sources: a local folder with {train,validation,test}.{jsonl,csv,parquet} (+ optional labels.json),
a dataset name under the data root ($SCALELORA_DATA_DIR or `data.root`), or a hub dataset name.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from scalelora.config import DataConfig
from scalelora.errors import ConfigError, DataError, one_line

DATA_DIR_ENV = "SCALELORA_DATA_DIR"
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

datasets.disable_progress_bars()


SINGLE_LABEL, MULTI_LABEL = "single_label", "multi_label"


@dataclass
class Splits:
    """Raw (untokenized) splits with a stable `idx` per row and `label`: an integer id (single-label)
    or a multi-hot list of 0.0/1.0 in label order (multi-label)."""

    label_names: list[str]
    train: datasets.Dataset
    eval: datasets.Dataset
    test: datasets.Dataset | None
    source: str
    fingerprints: dict[str, str] = field(default_factory=dict)
    dropped_empty: dict[str, int] = field(default_factory=dict)
    problem_type: str = SINGLE_LABEL


# --- finding the data ----------------------------------------------------------------------------


def data_root(cfg: DataConfig) -> Path | None:
    root = cfg.root or os.environ.get(DATA_DIR_ENV)
    return Path(root) if root else None


def resolve_local_folder(cfg: DataConfig) -> Path | None:
    """The local folder `data.path` names (directly or under the data root), or None for a hub name."""
    direct = Path(cfg.path).expanduser()
    if direct.is_dir():
        return direct
    root = data_root(cfg)
    if root is not None and (root / cfg.path).is_dir():
        return root / cfg.path
    if direct.exists():
        raise DataError(
            f"data.path={cfg.path} is a file; point it at the folder holding train/validation/test files"
        )
    return None


def split_file(folder: Path, split: str) -> Path | None:
    for suffix in FILE_FORMATS:
        candidate = folder / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def load_local_split(path: Path) -> datasets.Dataset:
    """Load one split file. Raises DataError naming the file (and the first bad line of a JSONL/CSV)."""
    builder = FILE_FORMATS[path.suffix]
    bad_line = find_bad_line(path)  # before datasets, which names no line and logs its own tracebacks
    if bad_line:
        raise DataError(bad_line)
    datasets_logger = datasets.logging.get_logger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(datasets.logging.CRITICAL)  # its error is re-raised below as one line
    try:
        # keep_in_memory: small classification sets; avoids a cache folder per edit of the file
        return datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as err:  # datasets raises many types for a malformed file
        raise DataError(describe_bad_file(path, err)) from None
    finally:
        datasets_logger.setLevel(level)


def find_bad_line(path: Path) -> str | None:
    """The first undecodable line of a JSONL/CSV file, as `path:line: what; fix`, or None."""
    if path.suffix not in (".jsonl", ".csv"):  # a .json file may be one JSON document, not lines
        return None
    try:
        lines = [line for line in path.read_bytes().decode("utf-8").splitlines() if line.strip()]
        if not lines or (path.suffix == ".csv" and len(lines) == 1):
            return f"{path}: the file has no rows; fill it with rows or remove it"
    except UnicodeDecodeError as bad:
        with path.open("rb") as handle:
            number = handle.read(bad.start).count(b"\n") + 1
        return f"{path}:{number}: not UTF-8 text (byte 0x{bad.object[bad.start]:02x}); save the file as UTF-8"
    except OSError as err:
        return f"{path}: cannot be read ({err.strerror or err})"
    return describe_bad_file(path, None, only_lines=True)


def describe_bad_file(path: Path, err: Exception | None, only_lines: bool = False) -> str | None:
    """Name the first bad line of a JSONL/CSV file (the datasets error does not)."""
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as bad:
                    return f"{path}:{number}: not valid JSON ({bad.msg}); fix or remove that line"
                if not isinstance(row, dict):
                    return f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}"
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", errors="replace", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            for row in reader:
                if row and len(row) != len(header):
                    return f"{path}:{reader.line_num}: {len(row)} fields where the header has {len(header)}; quote the text column"
    if only_lines:
        return None
    return f"{path}: cannot be read as {path.suffix[1:]} ({one_line(err, 200)})"


def load_raw_splits(cfg: DataConfig) -> tuple[dict[str, datasets.Dataset], list[str] | None, str]:
    """Return (split -> Dataset, label names from labels.json/ClassLabel or None, source description)."""
    wanted = [cfg.train_split, cfg.eval_split] + ([cfg.test_split] if cfg.test_split else [])
    folder = resolve_local_folder(cfg)
    if folder is not None:
        splits = {}
        for split in wanted:
            path = split_file(folder, split)
            if path is None:
                if split == cfg.test_split:
                    continue
                raise DataError(
                    f"{folder}: no {split}.jsonl/.csv/.parquet file for split '{split}' "
                    f"(set data.{'train' if split == cfg.train_split else 'eval'}_split to an existing split)"
                )
            splits[split] = load_local_split(path)
        names = None
        labels_file = folder / "labels.json"
        if labels_file.is_file():
            try:
                names = json.loads(labels_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as bad:
                raise DataError(f"{labels_file}: not valid JSON ({bad.msg})") from None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise DataError(f"{labels_file}: must be a JSON list of label names")
        return splits, names, str(folder)
    return load_hub_splits(cfg, wanted)


def load_hub_splits(
    cfg: DataConfig, wanted: list[str]
) -> tuple[dict[str, datasets.Dataset], list[str] | None, str]:
    root = data_root(cfg)
    try:
        loaded = datasets.load_dataset(cfg.path, cfg.hub_config)
    except Exception as err:
        where = (
            f"not found under the data root {root}"
            if root
            else f"no data root set (${DATA_DIR_ENV} or data.root)"
        )
        raise DataError(
            f"data.path={cfg.path}: not a local folder, {where}, and the hub could not load it "
            f"({one_line(err, 160)})"
        ) from None
    splits = {}
    for split in wanted:
        if split not in loaded:
            if split == cfg.test_split:
                continue
            raise DataError(f"data.path={cfg.path} has no split '{split}' (it has {', '.join(loaded)})")
        splits[split] = loaded[split]
    feature = splits[cfg.train_split].features.get(cfg.label_column)
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return splits, names, f"hub:{cfg.path}"


# --- labels ---------------------------------------------------------------------------------------


def is_integer_label(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def infer_label_names(values: list[Any]) -> list[str]:
    """Sorted distinct training labels (by value, never by object identity)."""
    distinct = set()
    for value in values:
        if is_integer_label(value):
            distinct.add(int(value))
        elif isinstance(value, str):
            distinct.add(value)
        else:
            # report a fractional value when there is one: Arrow turns a column with one 0.5 into 0.0, 1.0, ...
            shown = next((v for v in values if isinstance(v, float) and not v.is_integer()), value)
            row = next(i for i, v in enumerate(values) if v is shown or v == shown)
            raise DataError(
                f"training split row {row}: label {shown!r} is neither a name nor an integer id; "
                "classification labels must be names or integers 0..K-1: fix the label column"
            )
    if all(isinstance(v, int) for v in distinct):
        top = max(distinct)
        if min(distinct) < 0:
            raise DataError(
                f"negative label {min(distinct)} in the training split; labels must be 0..K-1 or names"
            )
        return [str(i) for i in range(top + 1)]
    if any(isinstance(v, int) for v in distinct):
        raise DataError("the label column mixes integers and strings; use one kind")
    return sorted(distinct)


def encode_labels(values: list[Any], names: list[str], split: str, column: str) -> list[int]:
    """Map raw labels (names or integer ids) to ids in `names`; DataError naming the first bad one."""
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for row, value in enumerate(values):
        if isinstance(value, str):
            if value not in index:
                raise DataError(
                    f"split '{split}' row {row}: label '{value}' is not in the label map {names}; "
                    "add it to labels.json / data.labels or filter it out with data.keep_labels"
                )
            ids.append(index[value])
        elif is_integer_label(value):
            if not 0 <= int(value) < len(names):
                raise DataError(
                    f"split '{split}' row {row}: label {value} is out of range for {len(names)} labels "
                    "(integer labels must be 0..K-1; set data.labels to name them)"
                )
            ids.append(int(value))
        elif isinstance(value, float):
            raise DataError(
                f"split '{split}' row {row}: label {value!r} in column '{column}' is not an integer; "
                "classification labels must be names or integer ids"
            )
        else:
            raise DataError(
                f"split '{split}' row {row}: label {value!r} in column '{column}' is missing or of wrong type; "
                "give every row a label name or integer id, or remove the row"
            )
    return ids


def split_label_strings(values: list[Any], separator: str | None) -> list[Any]:
    """`data.label_separator`: a string label `a|b` becomes the list [a, b] (blank parts dropped)."""
    if not separator:
        return values
    return [
        [part.strip() for part in v.split(separator) if part.strip()] if isinstance(v, str) else v
        for v in values
    ]


def detect_problem_type(values: list[Any], setting: str, split: str, separator: str | None) -> str:
    """`single_label` or `multi_label` for a split's labels (after `split_label_strings`).

    `auto` means multi-label when any label is a list. Raises DataError naming the first row that
    breaks the pattern: lists mixed with plain labels, or lists where single-label was asked for.
    """
    is_list = [isinstance(v, (list, tuple)) for v in values]
    if any(is_list) and not all(is_list):
        first_kind = is_list[0]
        row = is_list.index(not first_kind)
        kinds = ("a list", "a plain label") if first_kind else ("a plain label", "a list")
        raise DataError(
            f"split '{split}' row {row}: label {values[row]!r} is {kinds[1]} while row 0 holds {kinds[0]}; "
            "give every row a list of label names for multi-label data (or one name for single-label)"
        )
    if any(is_list):
        if setting == SINGLE_LABEL:
            raise DataError(
                f"split '{split}' row 0: label {values[0]!r} is a list but data.problem_type=single_label; "
                "set data.problem_type=multi_label (or auto)"
            )
        return MULTI_LABEL
    return MULTI_LABEL if setting == MULTI_LABEL or separator else SINGLE_LABEL


def encode_label_sets(
    values: list[Any], names: list[str], split: str, column: str, allow_empty: bool
) -> list[list[float]]:
    """Map label lists (names or integer ids; a plain label is a one-label set) to multi-hot rows in
    `names` order. Raises DataError naming the row of the first unknown label or empty list."""
    index = {name: i for i, name in enumerate(names)}
    rows = []
    for row, value in enumerate(values):
        members = list(value) if isinstance(value, (list, tuple)) else [value]
        if not members and not allow_empty:
            raise DataError(
                f"split '{split}' row {row}: empty label list in column '{column}'; give each row at least one "
                "label, remove the row, or set data.allow_empty_labels=true if 'no label' is meant"
            )
        hot = [0.0] * len(names)
        for member in members:
            if isinstance(member, str) and member in index:
                hot[index[member]] = 1.0
            elif is_integer_label(member) and 0 <= int(member) < len(names):
                hot[int(member)] = 1.0
            else:
                raise DataError(
                    f"split '{split}' row {row}: label {member!r} in the list {list(members)!r} is not in the "
                    f"label map {names}; add it to labels.json / data.labels or filter it out with data.keep_labels"
                )
        rows.append(hot)
    return rows


def fingerprint(ds: datasets.Dataset, columns: list[str]) -> str:
    digest = hashlib.sha256()
    for column in columns:
        for value in ds[column]:
            digest.update(repr(value).encode())
            digest.update(b"\x00")
    return digest.hexdigest()[:16]


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Load, validate and label-encode the train/eval/test splits.

    Raises DataError for missing files or columns, unknown / float / out-of-range labels, empty
    texts (unless `drop_empty`), and splits that are empty after filtering.
    """
    raw, file_names, source = load_raw_splits(cfg)
    check_columns(raw, cfg)
    raw_labels, problem = read_labels(raw, cfg)
    multi = problem == MULTI_LABEL
    if multi and cfg.class_balanced:
        raise ConfigError(
            "data.class_balanced=true has no sound rule for multi-label data (a row carries several labels, so "
            "no draw makes every label equally likely); use train.class_weights=balanced (per-label pos_weight)"
        )
    names = label_map(raw_labels[cfg.train_split], file_names, cfg, multi)
    encoded: dict[str, datasets.Dataset] = {}
    dropped: dict[str, int] = {}
    for split, ds in raw.items():
        table = label_table(split, ds, raw_labels[split], names, cfg, multi)
        table, dropped_rows = drop_empty_texts(split, table, cfg)
        if dropped_rows:
            dropped[split] = dropped_rows
        if cfg.keep_labels:
            table = keep_only(table, names, cfg, multi)
        if len(table) == 0:
            raise DataError(
                f"split '{split}' is empty after filtering (data.keep_labels={cfg.keep_labels}, data.drop_empty)"
            )
        encoded[split] = table
    train, evaluation, test = subsample(encoded, cfg, seed)
    label_names = list(cfg.keep_labels) if cfg.keep_labels else names
    result = Splits(label_names, train, evaluation, test, source, dropped_empty=dropped, problem_type=problem)
    for name, ds in (("train", train), ("eval", evaluation), ("test", test)):
        if ds is not None:
            result.fingerprints[name] = fingerprint(ds, ["idx", "text", "label"])
    return result


def check_columns(raw: dict[str, datasets.Dataset], cfg: DataConfig) -> None:
    """Raises DataError naming the first split without the text, pair or label column."""
    for split, ds in raw.items():
        for column in [cfg.text_column, cfg.label_column] + (
            [cfg.text_pair_column] if cfg.text_pair_column else []
        ):
            if column not in ds.column_names:
                raise DataError(
                    f"split '{split}' has no column '{column}' (columns: {', '.join(ds.column_names)}); "
                    f"set data.{'label' if column == cfg.label_column else 'text'}_column"
                )


def read_labels(raw: dict[str, datasets.Dataset], cfg: DataConfig) -> tuple[dict[str, list[Any]], str]:
    """Each split's label values (strings split on `data.label_separator`) and the problem type, decided
    on the training split. Raises DataError when a split mixes lists and plain labels, or holds another
    kind of label than the training split."""
    raw_labels = {
        split: split_label_strings(list(ds[cfg.label_column]), cfg.label_separator)
        for split, ds in raw.items()
    }
    problem = detect_problem_type(
        raw_labels[cfg.train_split], cfg.problem_type, cfg.train_split, cfg.label_separator
    )
    train_lists = any(isinstance(v, (list, tuple)) for v in raw_labels[cfg.train_split])
    for split, values in raw_labels.items():
        detect_problem_type(values, problem, split, cfg.label_separator)  # mixed rows within the split
        if values and isinstance(values[0], (list, tuple)) != train_lists:
            kind = "a list" if train_lists else "a plain label"
            raise DataError(
                f"split '{split}' row 0: label {values[0]!r} is not {kind} as in the training split; "
                "give every split the same kind of label"
            )
    return raw_labels, problem


def label_map(
    train_values: list[Any], file_names: list[str] | None, cfg: DataConfig, multi: bool
) -> list[str]:
    """The label names, in id order: `data.labels`, else the data's own list, else inferred from the
    training labels. Raises DataError for a repeated name or a `data.keep_labels` name not in the map."""
    if multi:
        train_values = [m for v in train_values for m in (v if isinstance(v, (list, tuple)) else [v])]
    names = list(cfg.labels) if cfg.labels else file_names or infer_label_names(list(train_values))
    if len(set(names)) != len(names):
        raise DataError(f"the label map {names} repeats a name")
    missing = [label for label in cfg.keep_labels or [] if label not in names]
    if missing:
        raise DataError(f"data.keep_labels names {missing}, not in the label map {names}")
    return names


def label_table(
    split: str, ds: datasets.Dataset, values: list[Any], names: list[str], cfg: DataConfig, multi: bool
) -> datasets.Dataset:
    """The split as `text` (+ `text_pair`), encoded `label` and its row number `idx`; a text that is not
    a string becomes empty. Raises DataError for a label not in the map."""
    ids: list[Any] = (
        encode_label_sets(values, names, split, cfg.label_column, cfg.allow_empty_labels)
        if multi
        else encode_labels(values, names, split, cfg.label_column)
    )
    columns = {
        "text": [t if isinstance(t, str) else "" for t in list(ds[cfg.text_column])],
        "label": ids,
        "idx": list(range(len(ds))),
    }
    if cfg.text_pair_column:
        columns["text_pair"] = [t if isinstance(t, str) else "" for t in list(ds[cfg.text_pair_column])]
    return datasets.Dataset.from_dict(columns)


def drop_empty_texts(split: str, table: datasets.Dataset, cfg: DataConfig) -> tuple[datasets.Dataset, int]:
    """The table without blank texts, and how many were dropped. Raises DataError naming the first one
    unless `data.drop_empty`."""
    empty = [i for i, t in enumerate(table["text"]) if not t.strip()]
    if not empty:
        return table, 0
    if not cfg.drop_empty:
        raise DataError(
            f"split '{split}' row {empty[0]}: empty text in column '{cfg.text_column}' "
            f"({len(empty)} such rows); set data.drop_empty=true to drop them"
        )
    empty_set = set(empty)
    return table.select([i for i in range(len(table)) if i not in empty_set]), len(empty)


def keep_only(table: datasets.Dataset, names: list[str], cfg: DataConfig, multi: bool) -> datasets.Dataset:
    """The rows and labels of `data.keep_labels`, relabelled in its order. Multi-label: each row keeps
    only the kept labels, and a row left with none is dropped unless empty label sets are allowed."""
    keep = cfg.keep_labels
    # vectorised: a row-by-row filter + map costs seconds per split on sets of 10k rows
    if multi:
        hot = np.asarray(table["label"], dtype=np.float32)[:, [names.index(label) for label in keep]]
        rows = np.arange(len(hot)) if cfg.allow_empty_labels else np.flatnonzero(hot.any(axis=1))
        return table.select(rows).remove_columns("label").add_column("label", hot[rows].tolist())
    keep_ids = {names.index(label): new for new, label in enumerate(keep)}
    old_ids = np.asarray(table["label"], dtype=np.int64)
    rows = np.flatnonzero(np.isin(old_ids, list(keep_ids)))
    new_ids = np.vectorize(keep_ids.get, otypes=[np.int64])(old_ids[rows]) if len(rows) else []
    return table.select(rows).remove_columns("label").add_column("label", list(map(int, new_ids)))


def subsample(
    encoded: dict[str, datasets.Dataset], cfg: DataConfig, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset | None]:
    """The train, eval and test splits, each cut to a seeded random `data.max_train_samples` /
    `data.max_eval_samples` rows when it has more."""
    train = encoded[cfg.train_split]
    if cfg.max_train_samples and cfg.max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(cfg.max_train_samples))
    evaluation = encoded[cfg.eval_split]
    test = encoded.get(cfg.test_split) if cfg.test_split else None
    if cfg.max_eval_samples:
        if cfg.max_eval_samples < len(evaluation):
            evaluation = evaluation.shuffle(seed=seed).select(range(cfg.max_eval_samples))
        if test is not None and cfg.max_eval_samples < len(test):
            test = test.shuffle(seed=seed).select(range(cfg.max_eval_samples))
    return train, evaluation, test


# --- class weights --------------------------------------------------------------------------------


def is_multi_label(ds: datasets.Dataset) -> bool:
    return len(ds) > 0 and isinstance(ds[0]["label"], list)


def label_counts(ds: datasets.Dataset, num_labels: int) -> np.ndarray:
    """Rows per label (multi-label: rows carrying the label)."""
    if is_multi_label(ds):
        return np.asarray(ds["label"], dtype=np.float64).sum(axis=0).astype(np.int64)
    return np.bincount(np.asarray(ds["label"], dtype=np.int64), minlength=num_labels)


def class_weights(
    setting: str | dict[str, float], label_names: list[str], train: datasets.Dataset
) -> list[float] | None:
    """The per-class weights `train.class_weights` asks for, in label order (None for `none`).

    `balanced` is N / (K * count_k) over the training split as filtered (keep_labels, subsets), so
    every class carries the same total weight; a class absent from training gets the weight of a
    class seen once. Multi-label: per-label BCE `pos_weight`, `balanced` being (N - count_k) / count_k
    (negatives / positives). Raises ConfigError for a mapping that names labels the data does not have.
    """
    if setting == "none":
        return None
    if setting == "balanced":
        counts = label_counts(train, len(label_names))
        if is_multi_label(train):
            return [(len(train) - int(c)) / max(int(c), 1) for c in counts]
        return [len(train) / (len(label_names) * max(int(c), 1)) for c in counts]
    unknown = [name for name in setting if name not in label_names]
    if unknown:
        raise ConfigError(
            f"train.class_weights names {unknown}, which are not labels of this data ({label_names}); "
            "use the label names (after data.keep_labels)"
        )
    return [float(setting.get(name, 1.0)) for name in label_names]


# --- tokenization and batching --------------------------------------------------------------------


def tokenize_split(ds: datasets.Dataset, tokenizer: Any, cfg: DataConfig) -> datasets.Dataset:
    """Tokenize without padding (batches pad dynamically); adds `length` for length grouping.

    Raises DataError for a row whose tokens end in the pad token (`models.check_last_tokens`): a decoder
    would classify it from the token before.
    """
    from scalelora.models import check_last_tokens

    has_pair = "text_pair" in ds.column_names

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out = tokenizer(
            batch["text"],
            batch["text_pair"] if has_pair else None,
            truncation=True,
            max_length=cfg.max_length,
        )
        check_last_tokens(
            out["input_ids"], tokenizer.pad_token_id, tokenizer, lambda k: f"row {batch['idx'][k]}"
        )
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    keep = {"label", "idx"}
    remove = [c for c in ds.column_names if c not in keep]
    # an explicit fingerprint: otherwise datasets dill-hashes the whole tokenizer, ~1 s per split
    settings = (
        ds._fingerprint,
        type(tokenizer).__name__,
        getattr(tokenizer, "name_or_path", ""),
        len(tokenizer),
        tokenizer.truncation_side,
        cfg.max_length,
        has_pair,
        tokenizer.pad_token_id,  # the rows were checked against it (check_last_tokens)
    )
    fingerprint = hashlib.sha256(repr(settings).encode()).hexdigest()[:16]
    tokenized = ds.map(
        encode, batched=True, batch_size=1000, remove_columns=remove, new_fingerprint=fingerprint
    )
    return tokenized.rename_column("label", "labels")


def check_lengths(tokenized: dict[str, datasets.Dataset], limit: int | None, model_name: str) -> None:
    """Raise DataError when a tokenized example is longer than the model's position table.

    Texts are truncated to `data.max_length`; this catches a max_length above what the model
    handles, which would otherwise fail deep inside the forward pass.
    """
    if limit is None:
        return
    for split, ds in tokenized.items():
        lengths = np.asarray(ds["length"])
        if len(lengths) and lengths.max() > limit:
            row = int(lengths.argmax())
            raise DataError(
                f"split '{split}' row {row} has {int(lengths[row])} tokens, more than the {limit} positions "
                f"model.name={model_name} handles; set data.max_length={limit} (or lower) so longer texts are truncated"
            )


def epoch_draw(rng: np.random.Generator, size: int, labels: np.ndarray | None) -> np.ndarray:
    """The examples of one epoch, in random order: a permutation, or with `labels` a class-balanced
    draw of `size` examples with replacement (each class equally likely, each example of a class too)."""
    if labels is None:
        return rng.permutation(size)
    counts = np.bincount(labels)
    p = 1.0 / counts[labels]
    return rng.choice(size, size=size, replace=True, p=p / p.sum())


class LengthGroupedSampler(Sampler[int]):
    """Indices in an order where each consecutive `batch_size` chunk has similar lengths.

    Per epoch: a seeded draw (`epoch_draw`: a permutation, or class-balanced with `labels`) is cut
    into mega-batches of `batch_size * group_factor`, each sorted by length and cut into batches, and
    the batches are shuffled. The order depends only on (seed, epoch), so every rank computes the same
    one and Accelerate shards it by batch, and a resumed run sees the same batches.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int,
        group_factor: int = 50,
        labels: list[int] | None = None,
    ) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_factor = group_factor
        self.labels = np.asarray(labels, dtype=np.int64) if labels is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = epoch_draw(rng, len(self.lengths), self.labels)
        mega = self.batch_size * self.group_factor
        batches = []
        for start in range(0, len(order), mega):
            chunk = order[start : start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        full = [b for b in batches if len(b) == self.batch_size]
        partial = [b for b in batches if len(b) != self.batch_size]
        for position in rng.permutation(len(full)):
            yield from full[position].tolist()
        for batch in partial:  # the short batch last, so every other batch is full
            yield from batch.tolist()


class SeededRandomSampler(Sampler[int]):
    """A plain shuffle (or class-balanced draw) that depends only on (seed, epoch), for data.group_by_length=false."""

    def __init__(self, size: int, seed: int, labels: list[int] | None = None) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self.labels = np.asarray(labels, dtype=np.int64) if labels is not None else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        yield from epoch_draw(np.random.default_rng([self.seed, self.epoch]), self.size, self.labels).tolist()


class PadCollator:
    """Pad model inputs to the longest in the batch (optionally to a multiple, to bound compiled shapes)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # one flat copy per input scattered through a mask, not a tensor per row: 10x faster at batch 32
        lengths = np.fromiter((len(r["input_ids"]) for r in rows), dtype=np.int64, count=len(rows))
        longest = int(lengths.max())
        if self.multiple:
            longest = int(math.ceil(longest / self.multiple) * self.multiple)
        real = np.arange(longest) < lengths[:, None]
        batch: dict[str, torch.Tensor] = {}
        for key in MODEL_INPUTS:
            if key not in rows[0]:
                continue
            fill = self.pad_token_id if key == "input_ids" else 0
            padded = np.full((len(rows), longest), fill, dtype=np.int64)
            flat = itertools.chain.from_iterable(r[key] for r in rows)
            padded[real] = np.fromiter(flat, dtype=np.int64, count=int(lengths.sum()))
            batch[key] = torch.from_numpy(padded)
        labels = [r["labels"] for r in rows]
        # multi-label rows are multi-hot float vectors (BCE targets), single-label rows class ids
        batch["labels"] = torch.tensor(
            labels, dtype=torch.float32 if isinstance(labels[0], list) else torch.long
        )
        batch["idx"] = torch.tensor([r["idx"] for r in rows], dtype=torch.long)
        return batch


def train_dataloader(
    ds: datasets.Dataset,
    cfg: DataConfig,
    batch_size: int,
    seed: int,
    collate: PadCollator,
    pin_memory: bool = False,
) -> DataLoader:
    """`pin_memory`: batches in page-locked memory, for asynchronous copies to a GPU
    (`runtime.pins_memory(device)` says when)."""
    sampler: Sampler[int]
    labels = list(ds["labels"]) if cfg.class_balanced else None
    if cfg.group_by_length:
        sampler = LengthGroupedSampler(list(ds["length"]), batch_size, seed, labels=labels)
    else:
        sampler = SeededRandomSampler(len(ds), seed, labels=labels)
    columns = [c for c in ds.column_names if c != "length"]
    return DataLoader(
        ds.with_format(columns=columns),
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        # a loader without its own generator draws a seed from the global RNG at every iter(), which
        # shifts dropout masks after a resume; this one keeps the global RNG untouched
        generator=torch.Generator().manual_seed(seed),
    )


def micro_batches(
    accelerator: Any, loader: DataLoader, sampler: Any, start: int, batches_per_epoch: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The endless seeded stream of a prepared training `loader`, epoch after epoch, from micro-batch
    `start` (counted from the run's first); `sampler` is the one `train_dataloader` gave it.

    The epoch is set here, on the loader actually iterated and on the sampler, rather than left to
    `skip_first_batches`: Accelerate 1.0-1.14 build its skipping loader with iteration 0, whose
    `__iter__` then resets the sampler to epoch 0 (a resume inside epoch >= 1 replayed epoch 0's
    order). Skipped batches are dropped as index lists (Accelerate's SkipBatchSampler), never
    loaded or collated. The sampler's epoch is checked once its pass has started.
    """
    epoch, offset = divmod(start, batches_per_epoch)
    while True:
        current = accelerator.skip_first_batches(loader, offset) if offset else loader
        current.set_epoch(epoch)  # the loader's iteration count, which its __iter__ hands the sampler
        sampler.set_epoch(epoch)  # where a sharded batch sampler hides the sampler from it
        for position, batch in enumerate(current):
            if position == 0 and sampler.epoch != epoch:
                raise RuntimeError(
                    f"the training sampler runs epoch {sampler.epoch}, not {epoch}: the data order "
                    "would not be the uninterrupted run's (a change in Accelerate's data loader?)"
                )
            yield batch
        epoch, offset = epoch + 1, 0


def eval_dataloader(
    ds: datasets.Dataset,
    batch_size: int,
    collate: PadCollator,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Sorted by length (little padding); order does not matter for metrics. `pin_memory`: as
    `train_dataloader`'s."""
    order = np.argsort(-np.asarray(list(ds["length"])), kind="stable").tolist()
    columns = [c for c in ds.column_names if c != "length"]
    return DataLoader(
        ds.select(order).with_format(columns=columns),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
    )
