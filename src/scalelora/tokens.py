"""Tokenization at scale: Arrow record batches in, Arrow record batches out, without padding.

A fast (Rust) tokenizer is called through its backend's `encode_batch` once `set_truncation_and_padding`
has configured it exactly as `tokenizer(texts, pairs, truncation=True, max_length=N)` does: the same ids
(tested against that call), without the per-row Python dicts the call builds, which cost as much as the
tokenizing itself. Its encodings also say which rows were truncated (`overflowing`), for free. A slow
tokenizer goes through the ordinary call.

Columns written, as `datasets.map` over the ordinary call wrote them: `input_ids` (int32 lists),
`token_type_ids` and `attention_mask` (int8 lists) where the tokenizer's `model_input_names` has them,
`length`, and the label (`labels`) and row id (`idx`) carried over.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

BATCH_ROWS = 5_000
"""Rows per `encode_batch` call: large enough for the tokenizer's own threads, small enough that a batch
of 2,000-token texts stays a few hundred MB."""


def backend(tokenizer: Any) -> Any | None:
    """The Rust tokenizer behind a fast tokenizer (None for a slow one)."""
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - transformers depends on it
        return None
    rust = getattr(tokenizer, "_tokenizer", None)
    if isinstance(rust, tokenizers.Tokenizer) and hasattr(tokenizer, "set_truncation_and_padding"):
        return rust
    return None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What decides the ids a tokenizer gives a text: its class, its backend's whole definition (vocabulary,
    normalizer, pre-tokenizer, post-processor, added tokens) without the truncation and padding it happens
    to hold, the truncation side and the special-token settings. Two tokenizers with equal fingerprints
    give equal ids."""
    digest = hashlib.sha256()
    rust = backend(tokenizer)
    if rust is not None:
        definition = json.loads(rust.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
        digest.update(json.dumps(definition, sort_keys=True).encode())
    else:
        digest.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    settings = (
        type(tokenizer).__name__,
        tokenizer.truncation_side,
        getattr(tokenizer, "split_special_tokens", False),
        repr(getattr(tokenizer, "special_tokens_map", {})),
        tuple(getattr(tokenizer, "model_input_names", ())),
    )
    digest.update(repr(settings).encode())
    return digest.hexdigest()[:16]


def _configure(tokenizer: Any, rust: Any, max_length: int | None) -> None:
    """The backend set up as `tokenizer(..., truncation=True, max_length=max_length)` sets it (no
    truncation for None), no padding."""
    from transformers.tokenization_utils_base import TruncationStrategy
    from transformers.utils import PaddingStrategy

    strategy = TruncationStrategy.DO_NOT_TRUNCATE if max_length is None else TruncationStrategy.LONGEST_FIRST
    tokenizer.set_truncation_and_padding(
        padding_strategy=PaddingStrategy.DO_NOT_PAD,
        truncation_strategy=strategy,
        max_length=max_length,
        stride=0,
        pad_to_multiple_of=None,
        padding_side=None,
    )
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    if rust.encode_special_tokens != split:
        rust.encode_special_tokens = split


def list_array(values: list[list[int]], lengths: np.ndarray, dtype: Any) -> pa.Array:
    """Python lists of ints as an Arrow list array, built from one flat buffer (not row by row)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(values), dtype=dtype, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def constant_lists(lengths: np.ndarray, value: int) -> pa.Array:
    """Lists of `value` (int8) with the given lengths: attention masks without padding, single-text type ids."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.full(int(offsets[-1]), value, np.int8)))


def encode(
    tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int
) -> tuple[dict[str, pa.Array], np.ndarray]:
    """One batch: the model-input columns (plus `length`) and whether each row was truncated."""
    names = tuple(getattr(tokenizer, "model_input_names", ("input_ids", "attention_mask")))
    rust = backend(tokenizer)
    if rust is not None:
        _configure(tokenizer, rust, max_length)
        encodings = rust.encode_batch(
            texts if pairs is None else list(zip(texts, pairs)), add_special_tokens=True
        )
        ids = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
        # only a row that reached max_length can have been cut
        truncated = np.zeros(len(ids), dtype=bool)
        for row in np.flatnonzero(lengths >= max_length):
            truncated[row] = bool(encodings[row].overflowing)
        type_ids = (
            [e.type_ids for e in encodings] if pairs is not None and "token_type_ids" in names else None
        )
    else:
        out = tokenizer(texts, pairs, truncation=True, max_length=max_length, return_attention_mask=False)
        ids = out["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
        truncated = np.zeros(len(ids), dtype=bool)
        candidates = np.flatnonzero(lengths >= max_length).tolist()
        if candidates:
            full = token_lengths(
                tokenizer, [texts[i] for i in candidates], [pairs[i] for i in candidates] if pairs else None
            )
            truncated[candidates] = full > max_length
        type_ids = out.get("token_type_ids") if pairs is not None else None
    columns = {"input_ids": list_array(ids, lengths, np.int32)}
    if "token_type_ids" in names:
        columns["token_type_ids"] = (
            list_array(type_ids, lengths, np.int8) if type_ids is not None else constant_lists(lengths, 0)
        )
    if "attention_mask" in names:
        columns["attention_mask"] = constant_lists(lengths, 1)  # no padding: every token is real
    columns["length"] = pa.array(lengths)
    return columns, truncated


def token_lengths(tokenizer: Any, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
    """Each text's (pair's) length in tokens, special tokens included, never truncated."""
    out = np.zeros(len(texts), dtype=np.int64)
    rust = backend(tokenizer)
    for start in range(0, len(texts), BATCH_ROWS):
        chunk = texts[start : start + BATCH_ROWS]
        chunk_pairs = pairs[start : start + BATCH_ROWS] if pairs is not None else None
        if rust is not None:
            _configure(tokenizer, rust, None)
            encodings = rust.encode_batch(
                chunk if chunk_pairs is None else list(zip(chunk, chunk_pairs)), add_special_tokens=True
            )
            out[start : start + len(chunk)] = [len(e) for e in encodings]
        else:
            ids = tokenizer(chunk, chunk_pairs, truncation=False, verbose=False)["input_ids"]
            out[start : start + len(chunk)] = [len(i) for i in ids]
    return out


def tokenize_batches(
    table: pa.Table,
    tokenizer: Any,
    max_length: int,
    progress: Callable[[int], None] | None = None,
    long_text: Any = None,
) -> Iterator[tuple[pa.RecordBatch, int]]:
    """Record batches of the tokenized `table` (columns `text`, optional `text_pair`, `label`, `idx`),
    each with its number of truncated rows (rows not read whole). `long_text` (longtext.LongText, None:
    truncate): data.clean_html cleans the texts first; head_tail and chunk cut them as longtext.py says."""
    from scalelora import longtext

    has_pair = "text_pair" in table.column_names
    settings = long_text if long_text is not None else longtext.LongText(max_length=max_length)
    for start in range(0, table.num_rows, BATCH_ROWS):
        part = table.slice(start, BATCH_ROWS)
        texts = part.column("text").to_pylist()
        pairs = part.column("text_pair").to_pylist() if has_pair else None
        if settings.clean_html:
            texts = longtext.prepare_texts(texts, settings)
            pairs = longtext.prepare_texts(pairs, settings) if pairs is not None else None
        if settings.mode == longtext.TRUNCATE:
            columns, truncated = encode(tokenizer, texts, pairs, max_length)
        else:
            columns, truncated = encode_long(
                tokenizer, texts, pairs, settings, part.column("idx").to_pylist()
            )
        columns["labels"] = part.column("label").combine_chunks()
        columns["idx"] = part.column("idx").combine_chunks()
        if settings.mode == longtext.TRUNCATE:
            check_pad_endings(columns, tokenizer)
        yield pa.RecordBatch.from_pydict(columns), int(truncated.sum())
        if progress is not None:
            progress(part.num_rows)


def encode_long(
    tokenizer: Any, texts: list[str], pairs: list[str] | None, settings: Any, idx: list[int]
) -> tuple[dict[str, pa.Array], np.ndarray]:
    """One batch under data.long_text=head_tail or chunk (longtext.encode_batch: a row is one input, or
    a list of windows), and which rows were not read whole: head_tail cut their middle, chunk dropped
    windows beyond data.max_chunks. A row (or window) ending in the pad token is refused."""
    from scalelora import longtext
    from scalelora.models import check_last_tokens

    out = longtext.encode_batch(tokenizer, texts, pairs, settings)
    rows, text_of = longtext.model_rows(out["input_ids"], settings.chunked)
    check_last_tokens(rows, tokenizer.pad_token_id, tokenizer, lambda k: f"row {idx[text_of[k]]}")
    full = np.asarray(out[longtext.FULL_LENGTH], dtype=np.int64)
    if settings.chunked:
        specials = longtext.special_tokens(tokenizer)
        budget = longtext.budget_of(settings, specials)
        content = full - len(specials.prefix["input_ids"]) - len(specials.suffix["input_ids"])
        needed = longtext.windows_needed(content, budget, settings.chunk_stride)
        truncated = needed > settings.max_chunks
    else:
        truncated = full > settings.max_length
    return {key: pa.array(values) for key, values in out.items()}, truncated


def ends_in_pad(input_ids: pa.ListArray, pad_token_id: int | None) -> np.ndarray:
    """The rows (positions in the batch) whose last token is the pad token."""
    if pad_token_id is None or len(input_ids) == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = input_ids.offsets.to_numpy()
    values = input_ids.values.to_numpy()
    nonempty = np.flatnonzero(offsets[1:] > offsets[:-1])
    last = values[offsets[1:][nonempty] - 1]
    return nonempty[last == pad_token_id]


def check_pad_endings(columns: dict[str, pa.Array], tokenizer: Any) -> None:
    """Refuse (models.check_last_tokens: one DataError line naming the rows) a batch with a row that ends
    in the pad token: a decoder finds its last token by id, and would classify it from the token before."""
    bad = ends_in_pad(columns["input_ids"], tokenizer.pad_token_id)
    if bad.size:
        from scalelora.models import check_last_tokens

        rows = [columns["input_ids"][int(i)].as_py() for i in bad]
        idx = columns["idx"]
        check_last_tokens(
            rows, tokenizer.pad_token_id, tokenizer, lambda k: f"row {idx[int(bad[k])].as_py()}"
        )


def parallelism_note() -> str:
    """How the tokenizer's own threads are set, for the log."""
    value = os.environ.get("TOKENIZERS_PARALLELISM")
    return "its own threads" if value is None or value.lower() in ("1", "true") else "one thread"
