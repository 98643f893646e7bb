"""Datasets: find and load splits, build and check the label map, tokenize once, batch by length,
and stream the training batches from any position.

Sources: a local folder with {train,validation,test}.{jsonl,csv,parquet} (+ optional labels.json),
a dataset name under the data root ($SCALELORA_DATA_DIR or `data.root`), or a hub dataset name.

Every pass over all rows runs in Arrow or numpy, never through `datasets`' row formatter (about 2 s per
200k rows) or a Python loop over the rows; the Python line-by-line readers run only once a file is known
to be bad, to name its first bad line. Large local files are loaded and tokenized once per machine into
an on-disk cache (`datacache.py`) that every process memory-maps.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Sampler

from scalelora import longtext
from scalelora.config import DataConfig
from scalelora.errors import ConfigError, DataError, one_line

DATA_DIR_ENV = "SCALELORA_DATA_DIR"
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SPLIT_NAMES = {"train": "train", "eval": "validation", "test": "test"}
"""The Splits attribute of each split and the name summary.json gives it (as its `eval` block does)."""
CLASS_WEIGHT_MAX_RATIO = 20.0
"""`balanced` class weights: no class weighs more than this many times the lightest (the largest class);
multi-label: no pos_weight above it (a positive counts as at most this many negatives). Above every
label skew of the committed results (emotion's 9.4x the largest), so their weights are unchanged."""
TRUNCATION_WARN_SHARE = 0.01
JSONL_BLOCK_BYTES = 16 << 20  # Arrow's JSON reader refuses a line longer than its block
SCAN_BLOCK_BYTES = 1 << 20
"""The bad-line scan of a JSONL file parses it in Arrow in line-aligned blocks of about this size; only the
first block that fails is read line by line in Python (a few thousand lines, not millions)."""
FINGERPRINT_ROWS = 20_000

Log = Callable[[str], None]

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
    files: dict[str, str] = field(default_factory=dict)
    """Where each split (train, eval, test) came from: a file, or `hub:NAME split S`."""
    truncated: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Rows longer than `data.max_length` (cut), by split name (SPLIT_NAMES): {"rows": n, "share": x}."""

    def named(self) -> Iterator[tuple[str, datasets.Dataset]]:
        """(attribute, split) for train, eval and, when there is one, test."""
        for name in ("train", "eval", "test"):
            ds = getattr(self, name)
            if ds is not None:
                yield name, ds


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


def wanted_splits(cfg: DataConfig) -> list[str]:
    return [cfg.train_split, cfg.eval_split] + ([cfg.test_split] if cfg.test_split else [])


def local_files(cfg: DataConfig, folder: Path) -> dict[str, Path]:
    """The file of each wanted split (a missing test split is left out). Raises DataError for a missing
    train or eval split."""
    files = {}
    for split in wanted_splits(cfg):
        path = split_file(folder, split)
        if path is None:
            if split == cfg.test_split:
                continue
            raise DataError(
                f"{folder}: no {split}.jsonl/.csv/.parquet file for split '{split}' "
                f"(set data.{'train' if split == cfg.train_split else 'eval'}_split to an existing split)"
            )
        files[split] = path
    return files


# --- reading files -------------------------------------------------------------------------------


def read_split(path: Path) -> pa.Table:
    """One split file as an Arrow table. Raises DataError naming the file (and the first bad line).

    JSONL goes through Arrow's reader, checked for what that reader lets pass (invalid UTF-8 inside a
    string, two objects on one line): a file it refuses or that fails a check goes to the line-by-line
    reader, which names the bad line. CSV rows are counted against the header by Arrow's parser, then
    loaded by `datasets` (its types and missing values, as before). Parquet and `.json` load through
    `datasets` as before.
    """
    if path.suffix == ".jsonl":
        table = read_jsonl(path)
        if table is not None:
            return table
    elif path.suffix == ".csv" and csv_rows_sound(path):
        return load_with_datasets(path)
    return load_local_split(path).data.table


def read_jsonl(path: Path) -> pa.Table | None:
    """The JSONL file as Arrow reads it, or None when Arrow refuses it or the table does not hold exactly
    one row per non-blank line of valid UTF-8 (the slow reader then decides)."""
    import pyarrow.json as pajson

    try:
        table = pajson.read_json(path, read_options=pajson.ReadOptions(block_size=JSONL_BLOCK_BYTES))
        table.validate(full=True)  # Arrow keeps a string's bytes as they are: this checks they are UTF-8
    except (pa.ArrowException, OSError):
        return None
    if table.num_rows == 0 or table.num_rows != count_lines(path):
        return None
    return table


def count_lines(path: Path) -> int:
    """Non-blank lines, counted in bytes (a line of spaces counts: the slow reader then decides)."""
    with path.open("rb") as handle:
        return count_block_lines(iter(lambda: handle.read(64 << 20), b""))


def count_block_lines(chunks: Iterator[bytes] | list[bytes]) -> int:
    """Non-blank lines of the bytes `chunks` hold one after the other."""
    lines = blank = 0
    previous = b"\n"
    for chunk in chunks:
        if not chunk:
            continue
        lines += chunk.count(b"\n")
        blank += chunk.count(b"\n\n") + chunk.count(b"\n\r\n") + (previous == b"\n" and chunk[:1] == b"\n")
        previous = chunk[-1:]
    if previous != b"\n":
        lines += 1  # the last line has no newline
    return lines - blank


def csv_rows_sound(path: Path) -> bool:
    """Whether every row of a CSV file has as many fields as its header (Arrow's parser, with the Python
    reader's quoting rules); False also when Arrow cannot parse it at all."""
    import pyarrow.csv as pacsv

    bad: list[Any] = []

    def invalid(row: Any) -> str:
        bad.append(row)
        return "skip"

    try:
        with path.open(encoding="utf-8", newline="") as handle:
            header = next(csv.reader(handle), [])
        if not header or len(set(header)) != len(header):
            return False
        reader = pacsv.open_csv(
            path,
            parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=invalid),
            convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(header, pa.string())),
        )
        rows = sum(batch.num_rows for batch in reader)
    except (pa.ArrowException, OSError, UnicodeDecodeError, csv.Error, StopIteration):
        return False
    return not bad and rows > 0


def load_with_datasets(path: Path) -> pa.Table:
    """Load one split file with `datasets` (in memory). Raises DataError naming the file."""
    datasets_logger = datasets.logging.get_logger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(datasets.logging.CRITICAL)  # its error is re-raised below as one line
    try:
        # keep_in_memory: no cache folder per edit of the file (large files are cached by datacache.py)
        ds = datasets.load_dataset(
            FILE_FORMATS[path.suffix], data_files=str(path), split="train", keep_in_memory=True
        )
    except Exception as err:  # datasets raises many types for a malformed file
        raise DataError(describe_bad_file(path, err)) from None
    finally:
        datasets_logger.setLevel(level)
    return ds.data.table


def load_local_split(path: Path) -> datasets.Dataset:
    """Load one split file the slow way: every line checked in Python first (naming the first bad one),
    then `datasets`. Raises DataError naming the file (and the first bad line of a JSONL/CSV)."""
    bad_line = find_bad_line(path)  # before datasets, which names no line and logs its own tracebacks
    if bad_line:
        raise DataError(bad_line)
    return datasets.Dataset(datasets.table.InMemoryTable(load_with_datasets(path)))


def find_bad_line(path: Path) -> str | None:
    """The first undecodable line of a JSONL/CSV file, as `path:line: what; fix`, or None."""
    if path.suffix == ".jsonl":
        return find_bad_jsonl_line(path)
    if path.suffix != ".csv":  # a .json file may be one JSON document, not lines
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


def find_bad_jsonl_line(path: Path) -> str | None:
    """`find_bad_line` for JSONL: the file in line-aligned blocks of about SCAN_BLOCK_BYTES, each decoded
    as UTF-8 and parsed by Arrow; the first block that fails either (or that Arrow reads as another number
    of rows than it has lines) is read line by line in Python, which names the line. The same messages as
    reading every line in Python, without a Python loop over every line."""
    before = 0  # lines before the block
    rows = False
    try:
        with path.open("rb") as handle:
            for block in line_blocks(handle, SCAN_BLOCK_BYTES):
                try:
                    text = block.decode("utf-8")
                except UnicodeDecodeError as bad:
                    number = before + block.count(b"\n", 0, bad.start) + 1
                    return f"{path}:{number}: not UTF-8 text (byte 0x{block[bad.start]:02x}); save the file as UTF-8"
                if not jsonl_block_sound(block):
                    found = first_bad_json_line(path, text.splitlines(keepends=True), before)
                    if found is not None:
                        return found
                rows = rows or bool(text.strip())
                before += block.count(b"\n")
    except OSError as err:
        return f"{path}: cannot be read ({err.strerror or err})"
    return None if rows else f"{path}: the file has no rows; fill it with rows or remove it"


def line_blocks(handle: Any, size: int) -> Iterator[bytes]:
    """The bytes of `handle` in blocks of about `size` that end at a newline (the last at the end of the
    file); a line longer than `size` makes its block longer."""
    carry = b""
    while chunk := handle.read(size):
        block = carry + chunk
        cut = block.rfind(b"\n") + 1
        if cut == 0:
            carry = block
            continue
        carry = block[cut:]
        yield block[:cut]
    if carry:
        yield carry


def jsonl_block_sound(block: bytes) -> bool:
    """Whether Arrow parses the block as one row per non-blank line (the checks of `read_jsonl`)."""
    import pyarrow.json as pajson

    try:
        table = pajson.read_json(
            pa.BufferReader(block), read_options=pajson.ReadOptions(block_size=max(len(block), 1 << 16))
        )
    except (pa.ArrowException, OSError):
        return False
    return table.num_rows == count_block_lines([block])


def first_bad_json_line(path: Path, lines: Iterable[str], before: int = 0) -> str | None:
    """The first line of `lines` (line `before` + 1 onwards of `path`) that is not a JSON object."""
    for number, line in enumerate(lines, start=before + 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as bad:
            return f"{path}:{number}: not valid JSON ({bad.msg}); fix or remove that line"
        if not isinstance(row, dict):
            return f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}"
    return None


def describe_bad_file(path: Path, err: Exception | None, only_lines: bool = False) -> str | None:
    """Name the first bad line of a JSONL/CSV file (the datasets error does not)."""
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8", errors="replace") as handle:
            found = first_bad_json_line(path, handle)
            if found is not None:
                return found
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


def read_labels_file(folder: Path) -> list[str] | None:
    labels_file = folder / "labels.json"
    if not labels_file.is_file():
        return None
    try:
        names = json.loads(labels_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as bad:
        raise DataError(f"{labels_file}: not valid JSON ({bad.msg})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{labels_file}: must be a JSON list of label names")
    return names


@dataclass
class RawSplits:
    tables: dict[str, pa.Table]
    label_names: list[str] | None
    """From labels.json or a ClassLabel feature (None: inferred from the labels)."""
    source: str
    files: dict[str, str]


def load_raw_splits(cfg: DataConfig, log: Log | None = None) -> RawSplits:
    """Each wanted split as an Arrow table, the label names the data declares, and where it came from."""
    folder = resolve_local_folder(cfg)
    if folder is None:
        return load_hub_splits(cfg, wanted_splits(cfg))
    files = local_files(cfg, folder)
    tables = {}
    for split, path in files.items():
        with stage(log, f"read {path.name}") as done:
            tables[split] = read_split(path)
            done(f"{tables[split].num_rows:,} rows, {path.stat().st_size / 2**20:,.0f} MiB")
    return RawSplits(tables, read_labels_file(folder), str(folder), {s: str(p) for s, p in files.items()})


def load_hub_splits(cfg: DataConfig, wanted: list[str]) -> RawSplits:
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
    tables = {split: arrow_table(ds) for split, ds in splits.items()}
    files = {split: f"hub:{cfg.path} split {split}" for split in splits}
    return RawSplits(tables, names, f"hub:{cfg.path}", files)


# --- labels ---------------------------------------------------------------------------------------


def shown(names: list[str], limit: int = 20) -> str:
    """A label map for a message: whole up to `limit` names, else its start and its size."""
    if len(names) <= limit:
        return str(names)
    return f"[{', '.join(map(repr, names[:limit]))}, ...] ({len(names)} labels)"


def is_integer_label(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def infer_label_names(values: list[Any], other_values: list[Any] = ()) -> list[str]:
    """Sorted distinct training labels (by value, never by object identity).

    Integer labels are values, not positions: the classes are the distinct integers of the training
    split and of `other_values` (the other splits), sorted numerically and named as written, so labels
    1..5 are 5 classes (never a 6th, empty class 0) and a class that only the validation split has is
    still one.
    """
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
                "classification labels must be names or integers: fix the label column"
            )
    if all(isinstance(v, int) for v in distinct):
        distinct.update(int(v) for v in other_values if is_integer_label(v))
        return [str(v) for v in sorted(distinct)]
    if any(isinstance(v, int) for v in distinct):
        raise DataError("the label column mixes integers and strings; use one kind")
    return sorted(distinct)


def integer_index(names: list[str], by_value: bool) -> dict[int, int] | None:
    """With label names inferred from integer labels (`by_value`), the id of each integer value."""
    return {int(name): i for i, name in enumerate(names)} if by_value else None


def encode_labels(
    values: list[Any], names: list[str], split: str, column: str, by_value: bool = False, first_row: int = 0
) -> list[int]:
    """Map raw labels (names or integers) to ids in `names`; DataError naming the first bad one.

    An integer label is an id (0..K-1) into `names` when the names are given (data.labels, labels.json,
    a ClassLabel), and a value looked up among them when they were inferred from the labels (`by_value`).
    """
    index = {name: i for i, name in enumerate(names)}
    values_index = integer_index(names, by_value)
    ids = []
    for row, value in enumerate(values, start=first_row):
        if isinstance(value, str):
            if value not in index:
                raise DataError(
                    f"split '{split}' row {row}: label '{value}' is not in the label map {shown(names)}; "
                    "add it to labels.json / data.labels or filter it out with data.keep_labels"
                )
            ids.append(index[value])
        elif is_integer_label(value):
            if values_index is not None and int(value) in values_index:
                ids.append(values_index[int(value)])
                continue
            if values_index is not None or not 0 <= int(value) < len(names):
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
    values: list[Any],
    names: list[str],
    split: str,
    column: str,
    allow_empty: bool,
    by_value: bool = False,
) -> list[list[float]]:
    """Map label lists (names or integers, as `encode_labels` reads them; a plain label is a one-label
    set) to multi-hot rows in `names` order. Raises DataError naming the row of the first unknown label
    or empty list."""
    index = {name: i for i, name in enumerate(names)}
    values_index = integer_index(names, by_value)
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
            elif is_integer_label(member) and values_index is not None and int(member) in values_index:
                hot[values_index[int(member)]] = 1.0
            elif is_integer_label(member) and values_index is None and 0 <= int(member) < len(names):
                hot[int(member)] = 1.0
            else:
                raise DataError(
                    f"split '{split}' row {row}: label {member!r} in the list {list(members)!r} is not in the "
                    f"label map {shown(names)}; add it to labels.json / data.labels or filter it out with data.keep_labels"
                )
        rows.append(hot)
    return rows


def is_json_column(column: pa.ChunkedArray) -> bool:
    return getattr(column.type, "extension_name", None) == "arrow.json"


def column_values(column: pa.ChunkedArray) -> list[Any]:
    """A column's values as Python objects. `datasets` keeps a JSON column whose rows hold different kinds
    (a list here, a string there) as JSON text (its `arrow.json` extension type): decoded here, as its
    row formatter would."""
    if is_json_column(column):
        return [
            None if v is None else json.loads(v) for v in column.cast(column.type.storage_type).to_pylist()
        ]
    return column.to_pylist()


def plain_kind(column: pa.ChunkedArray) -> str | None:
    """`name` (strings) or `int` for a label column without nulls that Arrow alone can encode; None for
    anything else (lists, floats, nulls, ...), which the row-by-row encoder checks and reports."""
    if column.null_count:
        return None
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return "name"
    if pa.types.is_integer(column.type):
        return "int"
    return None


@dataclass
class LabelMap:
    """The label names (in id order) and how each split's labels become ids: in Arrow (`kind`: names or
    integers, single-label, no nulls) or row by row (`values`: anything else), both naming the first bad
    row of a split in the same words."""

    names: list[str]
    problem_type: str
    by_value: bool
    """The names were inferred from integer labels: an integer is looked up among them, not an id."""
    kind: str | None
    columns: dict[str, pa.ChunkedArray]
    values: dict[str, list[Any]] | None = None

    def encode(self, split: str, cfg: DataConfig) -> pa.Array:
        """A split's labels as int64 ids, or multi-hot lists (list<double>)."""
        if self.values is not None:
            values = self.values[split]
            if self.problem_type == MULTI_LABEL:
                hot = encode_label_sets(
                    values, self.names, split, cfg.label_column, cfg.allow_empty_labels, self.by_value
                )
                return pa.array(hot, type=pa.list_(pa.float64()))
            return pa.array(
                encode_labels(values, self.names, split, cfg.label_column, self.by_value), pa.int64()
            )
        column, names = self.columns[split], self.names
        if self.kind == "name":
            found = pc.index_in(column.cast(pa.string()), value_set=pa.array(names, pa.string()))
            if found.null_count:
                row = int(np.flatnonzero(pc.is_null(found).to_numpy(zero_copy_only=False))[0])
                encode_labels([column[row].as_py()], names, split, cfg.label_column, first_row=row)  # raises
            return pc.cast(found, pa.int64()).combine_chunks()
        values = column.to_numpy().astype(np.int64)
        if self.by_value:
            return pa.array(np.searchsorted(np.asarray([int(n) for n in names]), values))
        bad = np.flatnonzero((values < 0) | (values >= len(names)))
        if len(bad):
            row = int(bad[0])
            encode_labels([int(values[row])], names, split, cfg.label_column, first_row=row)  # raises
        return pa.array(values)


def build_label_map(raw: RawSplits, cfg: DataConfig) -> LabelMap:
    """The label map of the data and how to encode it (see LabelMap). Raises DataError / ConfigError for
    labels of mixed kinds, a repeated name, an unknown `data.keep_labels` name, or `data.class_balanced`
    on multi-label data."""
    columns = {split: table.column(cfg.label_column) for split, table in raw.tables.items()}
    kinds = {plain_kind(column) for column in columns.values()}
    if len(kinds) == 1 and None not in kinds and not cfg.label_separator and cfg.problem_type != MULTI_LABEL:
        kind = kinds.pop()
        given = list(cfg.labels) if cfg.labels else raw.label_names
        if given is not None:
            names = list(given)
        elif kind == "name":
            names = sorted(pc.unique(columns[cfg.train_split]).to_pylist())
        else:
            values = np.unique(np.concatenate([c.to_numpy() for c in columns.values()]))
            names = [str(int(v)) for v in values]
        check_label_map(names, cfg)
        return LabelMap(names, SINGLE_LABEL, given is None and kind == "int", kind, columns)
    values = {
        split: split_label_strings(column_values(column), cfg.label_separator)
        for split, column in columns.items()
    }
    problem = check_label_kinds(values, cfg)
    if problem == MULTI_LABEL and cfg.class_balanced:
        raise ConfigError(
            "data.class_balanced=true has no sound rule for multi-label data (a row carries several labels, so "
            "no draw makes every label equally likely); use train.class_weights=balanced (per-label pos_weight)"
        )
    names, by_value = label_map(values, raw.label_names, cfg, problem == MULTI_LABEL)
    return LabelMap(names, problem, by_value, None, columns, values)


def check_label_kinds(values: dict[str, list[Any]], cfg: DataConfig) -> str:
    """The problem type, decided on the training split. Raises DataError when a split mixes lists and
    plain labels, or holds another kind of label than the training split."""
    problem = detect_problem_type(
        values[cfg.train_split], cfg.problem_type, cfg.train_split, cfg.label_separator
    )
    train_lists = any(isinstance(v, (list, tuple)) for v in values[cfg.train_split])
    for split, split_values in values.items():
        detect_problem_type(split_values, problem, split, cfg.label_separator)  # mixed rows within the split
        if split_values and isinstance(split_values[0], (list, tuple)) != train_lists:
            kind = "a list" if train_lists else "a plain label"
            raise DataError(
                f"split '{split}' row 0: label {split_values[0]!r} is not {kind} as in the training split; "
                "give every split the same kind of label"
            )
    return problem


def label_map(
    values: dict[str, list[Any]], file_names: list[str] | None, cfg: DataConfig, multi: bool
) -> tuple[list[str], bool]:
    """The label names, in id order: `data.labels`, else the data's own list, else inferred from the
    labels (`infer_label_names`); and whether they were inferred from integers (`by_value`). Raises
    DataError for a repeated name or a `data.keep_labels` name not in the map."""

    def flat(split_values: list[Any]) -> list[Any]:
        if not multi:
            return split_values
        return [m for v in split_values for m in (v if isinstance(v, (list, tuple)) else [v])]

    given = list(cfg.labels) if cfg.labels else file_names
    if given is not None:
        names, by_value = list(given), False
    else:
        train = flat(values[cfg.train_split])
        others = [v for split, vs in values.items() if split != cfg.train_split for v in flat(vs)]
        names = infer_label_names(list(train), others)
        by_value = bool(train) and all(is_integer_label(v) for v in train)
    check_label_map(names, cfg)
    return names, by_value


def check_label_map(names: list[str], cfg: DataConfig) -> None:
    if len(set(names)) != len(names):
        raise DataError(f"the label map {shown(names)} repeats a name")
    missing = [label for label in cfg.keep_labels or [] if label not in names]
    if missing:
        raise DataError(f"data.keep_labels names {missing}, not in the label map {shown(names)}")


# --- the encoded tables ---------------------------------------------------------------------------


def text_column(table: pa.Table, name: str) -> pa.Array | pa.ChunkedArray:
    """A text column as strings, anything that is not a string (null, a number) as ""."""
    column = table.column(name)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return pc.fill_null(column, "") if column.null_count else column  # no copy of a clean column
    if is_json_column(column):
        return pa.array([v if isinstance(v, str) else "" for v in column_values(column)], pa.string())
    return pc.fill_null(pa.nulls(table.num_rows, pa.string()), "")


def label_table(split: str, table: pa.Table, labels: pa.Array, cfg: DataConfig) -> pa.Table:
    """The split as `text` (+ `text_pair`), encoded `label` and its row number `idx`."""
    columns = {"text": text_column(table, cfg.text_column)}
    if cfg.text_pair_column:
        columns["text_pair"] = text_column(table, cfg.text_pair_column)
    columns["label"] = labels
    columns["idx"] = pa.array(np.arange(table.num_rows, dtype=np.int64))
    return pa.table(columns)


def blank_rows(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Rows whose text is empty or only whitespace."""
    blank = pc.or_(pc.equal(pc.utf8_length(texts), 0), pc.utf8_is_space(texts))
    return np.flatnonzero(blank.to_numpy(zero_copy_only=False))


def drop_empty_texts(split: str, table: pa.Table, cfg: DataConfig) -> tuple[pa.Table, int]:
    """The table without blank texts, and how many were dropped. Raises DataError naming the first one
    unless `data.drop_empty`."""
    empty = blank_rows(table.column("text"))
    if not len(empty):
        return table, 0
    if not cfg.drop_empty:
        raise DataError(
            f"split '{split}' row {int(empty[0])}: empty text in column '{cfg.text_column}' "
            f"({len(empty)} such rows); set data.drop_empty=true to drop them"
        )
    keep = np.ones(table.num_rows, dtype=bool)
    keep[empty] = False
    return table.filter(pa.array(keep)), len(empty)


def multi_hot(labels: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """Multi-hot label lists as a (rows, labels) float array."""
    flat = pc.list_flatten(labels).to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float64).reshape(-1, width)


def keep_only(table: pa.Table, names: list[str], cfg: DataConfig, multi: bool) -> pa.Table:
    """The rows and labels of `data.keep_labels`, relabelled in its order. Multi-label: each row keeps
    only the kept labels, and a row left with none is dropped unless empty label sets are allowed."""
    keep = cfg.keep_labels
    position = table.column_names.index("label")
    if multi:
        hot = multi_hot(table.column("label"), len(names))[:, [names.index(label) for label in keep]]
        rows = np.arange(len(hot)) if cfg.allow_empty_labels else np.flatnonzero(hot.any(axis=1))
        kept = pa.array(hot[rows].tolist(), type=pa.list_(pa.float64()))
        return table.take(pa.array(rows, pa.int64())).set_column(position, "label", kept)
    keep_ids = np.full(len(names), -1, dtype=np.int64)
    for new, label in enumerate(keep):
        keep_ids[names.index(label)] = new
    new_ids = keep_ids[table.column("label").to_numpy()]
    rows = np.flatnonzero(new_ids >= 0)
    return table.take(pa.array(rows, pa.int64())).set_column(position, "label", pa.array(new_ids[rows]))


def seeded_subset(size: int, wanted: int | None, seed: int) -> np.ndarray | None:
    """The rows of a seeded random subset of `wanted` rows, in `datasets`' `shuffle(seed).select(range(n))`
    order (so subsets are the ones earlier versions drew); None when the split is not larger."""
    if not wanted or wanted >= size:
        return None
    return np.random.default_rng(seed).permutation(size)[:wanted]


def subsample(encoded: dict[str, pa.Table], cfg: DataConfig, seed: int) -> dict[str, pa.Table]:
    """The train, eval and test tables (by Splits attribute), each cut to a seeded random
    `data.max_train_samples` / `data.max_eval_samples` rows when it has more."""
    wanted = {
        "train": (cfg.train_split, cfg.max_train_samples),
        "eval": (cfg.eval_split, cfg.max_eval_samples),
    }
    if cfg.test_split and cfg.test_split in encoded:
        wanted["test"] = (cfg.test_split, cfg.max_eval_samples)
    out = {}
    for name, (split, limit) in wanted.items():
        table = encoded[split]
        rows = seeded_subset(table.num_rows, limit, seed)
        out[name] = table if rows is None else table.take(pa.array(rows))
    return out


def fingerprint(table: pa.Table | datasets.Dataset, columns: list[str]) -> str:
    """sha256 of each value's repr, column after column (as earlier versions hashed them row by row, so
    the resume identity of their checkpoints still matches)."""
    digest = hashlib.sha256()
    for column in columns:
        values = arrow_column(table, column)
        for start in range(
            0, len(values), FINGERPRINT_ROWS
        ):  # in slices: a few MB of Python objects at a time
            part = values.slice(start, FINGERPRINT_ROWS).to_pylist()
            digest.update(("\x00".join(map(repr, part)) + "\x00").encode())
    return digest.hexdigest()[:16]


def check_several_classes(table: pa.Table, names: list[str], multi: bool, where: str) -> None:
    """Raise DataError when every training row has the same label (set): nothing to learn, and every
    metric would read 1.0."""
    if table.num_rows == 0:
        return
    if multi:
        hot = multi_hot(table.column("label"), len(names))
        if (hot == hot[0]).all():
            shown = [names[k] for k in np.flatnonzero(hot[0])]
            raise DataError(
                f"{where}: every training row has the label set {shown}; a classifier needs training rows "
                "that differ: add rows with other labels (or check data.keep_labels and data.max_train_samples)"
            )
        return
    present = np.unique(table.column("label").to_numpy())
    if len(present) == 1:
        raise DataError(
            f"{where}: every training row has the label '{names[int(present[0])]}'; a classifier needs at least "
            "2 classes in training: add rows of another class (or check data.keep_labels and data.max_train_samples)"
        )


def to_dataset(table: pa.Table, fingerprint_value: str) -> datasets.Dataset:
    """A `datasets.Dataset` over an Arrow table, without a copy (a memory-mapped table stays one) and
    without cache files: its `shuffle` and `select` keep their indices in memory."""
    return datasets.Dataset(datasets.table.InMemoryTable(table), fingerprint=fingerprint_value)


def load_splits(cfg: DataConfig, seed: int, log: Log | None = None) -> Splits:
    """Load, validate and label-encode the train/eval/test splits (in memory).

    Raises DataError for missing files or columns, unknown / float / out-of-range labels, empty
    texts (unless `drop_empty`), splits that are empty after filtering, and a training split with a
    single class.
    """
    raw = load_raw_splits(cfg, log)
    return encode_splits(raw, cfg, seed, log)


def encode_splits(raw: RawSplits, cfg: DataConfig, seed: int, log: Log | None = None) -> Splits:
    """`load_splits` from the raw tables."""
    with stage(log, "check and encode the labels") as done:
        check_columns(raw.tables, cfg)
        labels = build_label_map(raw, cfg)
        names, multi = labels.names, labels.problem_type == MULTI_LABEL
        encoded: dict[str, pa.Table] = {}
        dropped: dict[str, int] = {}
        for split, table in raw.tables.items():
            encoded_table, dropped_rows = drop_empty_texts(
                split, label_table(split, table, labels.encode(split, cfg), cfg), cfg
            )
            if dropped_rows:
                dropped[split] = dropped_rows
            if cfg.keep_labels:
                encoded_table = keep_only(encoded_table, names, cfg, multi)
            if encoded_table.num_rows == 0:
                raise DataError(
                    f"split '{split}' is empty after filtering (data.keep_labels={cfg.keep_labels}, data.drop_empty)"
                )
            encoded[split] = encoded_table
        tables = subsample(encoded, cfg, seed)
        label_names = list(cfg.keep_labels) if cfg.keep_labels else names
        files = {name: raw.files[split] for name, split in split_of(cfg, tables).items()}
        # here, not in load_data: every reader of a training split (a run, in memory or building the
        # cache, the teacher, the studies) refuses it, and a cache entry never holds one
        check_several_classes(tables["train"], label_names, multi, files["train"])
        prints = {name: fingerprint(table, ["idx", "text", "label"]) for name, table in tables.items()}
        done(
            f"{len(label_names)} labels, {labels.problem_type}, {sum(t.num_rows for t in tables.values()):,} rows"
        )
    return Splits(
        label_names,
        to_dataset(tables["train"], prints["train"]),
        to_dataset(tables["eval"], prints["eval"]),
        to_dataset(tables["test"], prints["test"]) if "test" in tables else None,
        raw.source,
        fingerprints=prints,
        dropped_empty=dropped,
        problem_type=labels.problem_type,
        files=files,
    )


def split_of(cfg: DataConfig, tables: dict[str, Any]) -> dict[str, str]:
    """The data's split name behind each Splits attribute present in `tables`."""
    names = {"train": cfg.train_split, "eval": cfg.eval_split, "test": cfg.test_split}
    return {name: names[name] for name in tables}


def check_columns(raw: dict[str, pa.Table], cfg: DataConfig) -> None:
    """Raises DataError naming the first split without the text, pair or label column."""
    for split, table in raw.items():
        for column in [cfg.text_column, cfg.label_column] + (
            [cfg.text_pair_column] if cfg.text_pair_column else []
        ):
            if column not in table.column_names:
                raise DataError(
                    f"split '{split}' has no column '{column}' (columns: {', '.join(table.column_names)}); "
                    f"set data.{'label' if column == cfg.label_column else 'text'}_column"
                )


# --- columns without the row formatter ------------------------------------------------------------


def arrow_table(ds: datasets.Dataset | pa.Table) -> pa.Table:
    """The rows of a Dataset (its indices applied) or a table, as an Arrow table."""
    if isinstance(ds, pa.Table):
        return ds
    table = ds.data.table
    if ds._indices is not None:
        table = table.take(ds._indices.column(0))
    return table


def arrow_column(ds: datasets.Dataset | pa.Table, name: str) -> pa.ChunkedArray:
    if isinstance(ds, pa.Table):
        return ds.column(name)
    column = ds.data.table.column(name)
    return column.take(ds._indices.column(0)) if ds._indices is not None else column


def numpy_column(ds: datasets.Dataset | pa.Table, name: str) -> np.ndarray:
    """A column of numbers as a numpy array."""
    return arrow_column(ds, name).to_numpy()


# --- progress -------------------------------------------------------------------------------------


class stage:
    """One step of the data phase: on a terminal a progress bar (with `total`), else one log line when it
    ends, with what it did and its time. `with stage(log, "tokenize train", total=n) as done:` gives
    `done(note)`, and `done.advance(rows)` moves the bar. Without `log` (another process), silent."""

    def __init__(self, log: Log | None, what: str, total: int | None = None) -> None:
        self.log, self.what, self.total = log, what, total
        self.note = ""
        self.bar: Any = None

    def __enter__(self) -> stage:
        import sys
        import time

        self.started = time.perf_counter()
        if self.log is not None and self.total and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.what, unit="rows", unit_scale=True, leave=False)
        return self

    def __call__(self, note: str) -> None:
        self.note = note

    def advance(self, rows: int) -> None:
        if self.bar is not None:
            self.bar.update(rows)

    def __exit__(self, kind: Any, *_: Any) -> None:
        import time

        if self.bar is not None:
            self.bar.close()
        if self.log is not None and kind is None:
            seconds = time.perf_counter() - self.started
            self.log(
                f"scalelora: data: {self.what}"
                + (f": {self.note}" if self.note else "")
                + f" ({seconds:.1f} s)"
            )


# --- class weights --------------------------------------------------------------------------------


def is_multi_label(ds: datasets.Dataset | pa.Table) -> bool:
    return pa.types.is_list(arrow_column(ds, "label").type)


def label_counts(ds: datasets.Dataset | pa.Table, num_labels: int) -> np.ndarray:
    """Rows per label (multi-label: rows carrying the label)."""
    if is_multi_label(ds):
        return multi_hot(arrow_column(ds, "label"), num_labels).sum(axis=0).astype(np.int64)
    return np.bincount(numpy_column(ds, "label").astype(np.int64), minlength=num_labels)


@dataclass
class Weights:
    values: list[float] | None
    capped: list[str] = field(default_factory=list)
    """The labels whose `balanced` weight CLASS_WEIGHT_MAX_RATIO bounded."""


def class_weights(
    setting: str | dict[str, float], label_names: list[str], train: datasets.Dataset | pa.Table
) -> list[float] | None:
    """The per-class weights `train.class_weights` asks for, in label order (None for `none`); see
    `bounded_class_weights`."""
    return bounded_class_weights(setting, label_names, train).values


def bounded_class_weights(
    setting: str | dict[str, float], label_names: list[str], train: datasets.Dataset | pa.Table
) -> Weights:
    """The per-class weights `train.class_weights` asks for, in label order, and the labels it bounded.

    `balanced` is N / (K * count_k) over the training split as filtered (keep_labels, subsets), so
    every class carries the same total weight; a class absent from training gets the weight of a
    class seen once. No class weighs more than CLASS_WEIGHT_MAX_RATIO times the lightest (a clip, as
    for any inverse-frequency weight: a class of one example among 1M would otherwise weigh ~2,000 and
    decide its batch's gradient alone). Multi-label: per-label BCE `pos_weight`, `balanced` being
    (N - count_k) / count_k (negatives / positives), at most CLASS_WEIGHT_MAX_RATIO. Raises ConfigError
    for a mapping that names labels the data does not have.
    """
    if setting == "none":
        return Weights(None)
    if setting == "balanced":
        counts = label_counts(train, len(label_names))
        rows = arrow_table(train).num_rows
        if is_multi_label(train):
            raw = [(rows - int(c)) / max(int(c), 1) for c in counts]
            ceiling = CLASS_WEIGHT_MAX_RATIO
        else:
            raw = [rows / (len(label_names) * max(int(c), 1)) for c in counts]
            ceiling = CLASS_WEIGHT_MAX_RATIO * min(raw)
        capped = [name for name, w in zip(label_names, raw) if w > ceiling]
        return Weights([min(w, ceiling) for w in raw], capped)
    unknown = [name for name in setting if name not in label_names]
    if unknown:
        raise ConfigError(
            f"train.class_weights names {unknown}, which are not labels of this data ({label_names}); "
            "use the label names (after data.keep_labels)"
        )
    return Weights([float(setting.get(name, 1.0)) for name in label_names])


def class_weight_tensor(
    cfg: Any, label_names: list[str], splits: Splits, device: Any, log: Log
) -> torch.Tensor | None:
    """`train.class_weights` resolved against the loaded labels, on `device` (None: unweighted), with its
    log lines (the weights, the bound when it applied, and a warning for a double correction)."""
    setting = cfg.train.class_weights
    weights = bounded_class_weights(setting, label_names, splits.train)
    if weights.values is None:
        return None
    if cfg.data.class_balanced and setting == "balanced":
        log(
            "scalelora: warning: data.class_balanced=true already samples every class equally often; "
            "train.class_weights=balanced on top counts the imbalance twice"
        )
    shown = ", ".join(f"{name}={w:.3g}" for name, w in zip(label_names, weights.values))
    multi = splits.problem_type == MULTI_LABEL
    kind = "per-label pos_weight" if multi else "class weights"
    log(f"scalelora: {kind} ({setting if isinstance(setting, str) else 'given'}): {shown}")
    if weights.capped:
        bound = "a positive at most" if multi else "no class more than"
        log(
            f"scalelora: {kind} bounded ({bound} {CLASS_WEIGHT_MAX_RATIO:g}x "
            + ("a negative" if multi else "the largest class")
            + f"): {len(weights.capped)} rare label(s), e.g. {', '.join(weights.capped[:5])}"
        )
    return torch.tensor(weights.values, dtype=torch.float32, device=device)


# --- tokenization ---------------------------------------------------------------------------------


def tokenize_split(ds: datasets.Dataset | pa.Table, tokenizer: Any, cfg: DataConfig) -> datasets.Dataset:
    """Tokenize without padding (batches pad dynamically); adds `length` for length grouping and renames
    `label` to `labels` (in memory; `tokenize_table` says how many rows were truncated). Long documents
    are read as `cfg`'s data.long_text and data.clean_html say (longtext.py)."""
    return tokenize_table(
        arrow_table(ds), tokenizer, cfg.max_length, long_text=longtext.LongText.from_config(cfg)
    )[0]


def tokenize_table(
    table: pa.Table,
    tokenizer: Any,
    max_length: int,
    progress: Callable[[int], None] | None = None,
    long_text: longtext.LongText | None = None,
) -> tuple[datasets.Dataset, int]:
    """The tokenized table in memory, and how many of its rows were truncated (not read whole)."""
    from scalelora import tokens

    batches, truncated = [], 0
    for batch, cut in tokens.tokenize_batches(table, tokenizer, max_length, progress, long_text):
        batches.append(batch)
        truncated += cut
    tokenized = pa.Table.from_batches(batches) if batches else empty_tokens(table, tokenizer)
    settings = long_text.record() if long_text is not None else None
    key = hashlib.sha256(
        repr((tokens.tokenizer_fingerprint(tokenizer), max_length, table.num_rows, settings)).encode()
    )
    return to_dataset(tokenized, key.hexdigest()[:16]), truncated


def empty_tokens(table: pa.Table, tokenizer: Any) -> pa.Table:
    from scalelora import tokens

    columns, _ = tokens.encode(tokenizer, [], None, 1)
    columns["labels"] = pa.array([], table.column("label").type)
    columns["idx"] = pa.array([], pa.int64())
    return pa.table(columns)


def truncation_record(rows: int, total: int) -> dict[str, Any]:
    return {"rows": int(rows), "share": rows / total if total else 0.0}


def truncation_lines(truncated: dict[str, dict[str, Any]], data: Any) -> list[str]:
    """A warning for each split with more than TRUNCATION_WARN_SHARE of its rows not read whole, in the
    words of `data.long_text` (a DataConfig): truncate cuts at max_length, head_tail cuts the middle,
    chunk drops the middle windows past max_chunks."""
    return [
        f"scalelora: warning: {100 * t['share']:.1f}% of the {split} texts ({t['rows']:,}) {not_read_whole(data)}"
        for split, t in truncated.items()
        if t["share"] > TRUNCATION_WARN_SHARE
    ]


def not_read_whole(data: Any) -> str:
    """What happened to a text that was not read whole, as `data.long_text` says (the warning's end)."""
    if data.long_text == longtext.HEAD_TAIL:
        return (
            f"are longer than data.max_length={data.max_length} tokens and lose their middle "
            "(data.long_text=head_tail keeps the first data.head_tokens and the rest from the end)"
        )
    if data.long_text == longtext.CHUNK:
        return (
            f"need more than data.max_chunks={data.max_chunks} windows of data.max_length={data.max_length} tokens "
            "and lose their middle windows (data.long_text=chunk keeps the first and the last)"
        )
    return (
        f"are longer than data.max_length={data.max_length} tokens and are cut to it "
        "(data.truncation_side says which end is kept)"
    )


def check_lengths(tokenized: dict[str, datasets.Dataset], limit: int | None, model_name: str) -> None:
    """Raise DataError when a tokenized example is longer than the model's position table.

    Texts are truncated to `data.max_length`; this catches a max_length above what the model
    handles, which would otherwise fail deep inside the forward pass.
    """
    if limit is None:
        return
    for split, ds in tokenized.items():
        lengths = numpy_column(ds, "length")
        if longtext.WINDOWS in ds.column_names:  # long documents (longtext.py): each window's length
            lengths = lengths // np.maximum(numpy_column(ds, longtext.WINDOWS), 1)  # every window is as long
        if len(lengths) and lengths.max() > limit:
            row = int(lengths.argmax())
            raise DataError(
                f"split '{split}' row {row} has {int(lengths[row])} tokens, more than the {limit} positions "
                f"model.name={model_name} handles; set data.max_length={limit} (or lower) so longer texts are truncated"
            )


# --- a run's data ---------------------------------------------------------------------------------

Choose = Callable[[Splits, np.ndarray], None]
"""The auto default: sets config keys from the loaded splits and what it measured on a training sample
(`autoconfig.LengthSample`: untruncated token lengths, the share with markup), before tokenizing."""


def load_data(
    cfg: Any, tokenizer: Any, accelerator: Any, log: Log, choose: Choose | None = None
) -> tuple[Splits, dict[str, datasets.Dataset]]:
    """A run's splits and their tokens (`train`, `eval`, `test`), with `Splits.truncated` filled in.

    Large local files (`data.cache`, `datacache.plan`) are loaded and tokenized once per machine, by its
    local main process, into the on-disk cache that every process memory-maps, and a later run with the
    same files and settings reuses it. Other data is loaded in memory by every process, the main process
    first (a hub download happens once, and its data error is every rank's). `log` prints on the main
    process; each step there gets a line with its time (a progress bar on a terminal).
    """
    from scalelora import datacache
    from scalelora.runtime import decide_on_main

    main_log = log if accelerator.is_main_process else None
    plan = datacache.plan(cfg.data, cfg.seed)
    if main_log is not None:
        where = "in memory" if plan is None else f"{plan.total_bytes / 2**20:,.0f} MiB, cached on disk"
        main_log(f"scalelora: data: {cfg.data.path} ({where})")
    if plan is not None:
        return datacache.load_cached(cfg, tokenizer, accelerator, main_log, choose, plan)

    def load(show: Log | None) -> tuple[Splits, dict[str, datasets.Dataset]]:
        splits = load_splits(cfg.data, cfg.seed, show)
        if choose is not None:
            from scalelora.autoconfig import measure

            choose(splits, measure(splits.train, tokenizer, cfg.data, cfg.explicit_keys))
        return splits, tokenize_splits(
            splits, tokenizer, cfg.data.max_length, show, longtext.LongText.from_config(cfg.data)
        )

    loaded = decide_on_main(accelerator, lambda: load(main_log), share_value=False)
    splits, tokenized = loaded if accelerator.is_main_process else load(None)
    for line in truncation_lines(splits.truncated, cfg.data):
        log(line)
    return splits, tokenized


def tokenize_splits(
    splits: Splits,
    tokenizer: Any,
    max_length: int,
    log: Log | None,
    long_text: longtext.LongText | None = None,
) -> dict[str, datasets.Dataset]:
    """Each split tokenized in memory (long documents as `long_text` says); `splits.truncated` filled in."""
    from scalelora import tokens

    tokenized = {}
    for name, ds in splits.named():
        table = arrow_table(ds)
        with stage(log, f"tokenize {name}", total=table.num_rows) as done:
            tokenized[name], cut = tokenize_table(table, tokenizer, max_length, done.advance, long_text)
            done(
                f"{table.num_rows:,} rows, {cut:,} {longtext.cut_label(long_text)}, {tokens.parallelism_note()}"
            )
        splits.truncated[SPLIT_NAMES[name]] = truncation_record(cut, table.num_rows)
    return tokenized


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
        lengths: list[int] | np.ndarray,
        batch_size: int,
        seed: int,
        group_factor: int = 50,
        labels: list[int] | np.ndarray | None = None,
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

    def __init__(self, size: int, seed: int, labels: list[int] | np.ndarray | None = None) -> None:
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
        if longtext.is_chunked(rows[0]):  # long documents (longtext.py): whole documents, window by window
            return longtext.collate_windows(rows, self.pad_token_id, self.multiple)
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
    labels = numpy_column(ds, "labels") if cfg.class_balanced else None
    if cfg.group_by_length:
        sampler = LengthGroupedSampler(numpy_column(ds, "length"), batch_size, seed, labels=labels)
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
    order = np.argsort(-numpy_column(ds, "length"), kind="stable")
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
