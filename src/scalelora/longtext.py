"""Long documents (`data.long_text`): what becomes of a text longer than `data.max_length` tokens.

- `truncate`: its first `max_length` tokens (HF tokenizers' truncation; as before this module).
- `head_tail`: its first `head_tokens` and its last tokens, one input of at most `max_length` tokens.
- `chunk`: windows of `max_length` tokens, consecutive ones sharing `chunk_stride` tokens, the last
  ending at the text's end; every window runs through the model, and the text's logits pool its
  windows' logits (`chunk_pool`). A chunked row holds one document: its windows' ids as a list of
  lists, so batching, length grouping, sharding over ranks and evaluation all count documents, and a
  batch always holds whole documents (`collate_windows` flattens them and maps each window to its
  document with `doc`).

`data.clean_html` (before tokenizing, in every mode) lives here too. Every place that turns raw texts
into logits (the training data, sample predictions, the teacher-logits cache, `predict`) goes through
`encode_batch`, and every place that turns window logits into a document's through `pool_logits`, so a
text gets the same logits wherever it is scored.
"""

from __future__ import annotations

import contextlib
import html
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from scalelora.errors import ConfigError

TRUNCATE, HEAD_TAIL, CHUNK = "truncate", "head_tail", "chunk"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DOC = "doc"
"""Batch key of a chunked batch: the document (row of `labels`) each window belongs to."""
FULL_LENGTH = "full_length"
"""Column of a head_tail / chunk split: the tokens the whole text needs as one input (special tokens
included); the text was cut when this exceeds `max_length` (head_tail) or a window's budget (chunk)."""
WINDOWS = "windows"
"""Column of a chunk split: the number of windows kept for the document."""
# The data keys that change the tokens of a split (beside the tokenizer, data.max_length and
# data.truncation_side): the data cache's tokens key (datacache.TOKEN_KEYS) includes them.
TOKEN_KEYS = ("data.long_text", "data.head_tokens", "data.chunk_stride", "data.max_chunks", "data.clean_html")


@dataclass(frozen=True)
class LongText:
    """What a run (or a saved model's scalelora.json) says about long texts."""

    mode: str = TRUNCATE
    max_length: int = 128
    head_tokens: int | None = None
    chunk_stride: int = 32
    max_chunks: int = 8
    chunk_pool: str = "mean"
    clean_html: bool = False

    @classmethod
    def from_config(cls, data: Any) -> LongText:
        """From a DataConfig (its chunk_stride resolved: None is a quarter of max_length)."""
        return cls(
            data.long_text,
            data.max_length,
            data.head_tokens,
            data.chunk_stride if data.chunk_stride is not None else data.max_length // 4,
            data.max_chunks,
            data.chunk_pool,
            data.clean_html,
        )

    @classmethod
    def from_meta(cls, meta: dict[str, Any], max_length: int) -> LongText:
        """From a saved model's scalelora.json (one written before these keys: truncate, no cleaning)."""
        default = cls()
        return cls(
            meta.get("long_text", TRUNCATE),
            max_length,
            meta.get("head_tokens"),
            meta.get("chunk_stride", max_length // 4),
            meta.get("max_chunks", default.max_chunks),
            meta.get("chunk_pool", default.chunk_pool),
            bool(meta.get("clean_html", False)),
        )

    def record(self) -> dict[str, Any]:
        """The settings that decide a text's logits, for scalelora.json and the teacher-logits cache
        manifest: the mode, cleaning, and the mode's own keys (max_length only where the mode is not
        truncate, whose max_length those files already record)."""
        out: dict[str, Any] = {"long_text": self.mode, "clean_html": self.clean_html}
        if self.mode == HEAD_TAIL:
            out.update(max_length=self.max_length, head_tokens=self.head_tokens)
        if self.mode == CHUNK:
            out.update(
                max_length=self.max_length,
                chunk_stride=self.chunk_stride,
                max_chunks=self.max_chunks,
                chunk_pool=self.chunk_pool,
            )
        return out

    @property
    def chunked(self) -> bool:
        return self.mode == CHUNK


BEFORE = LongText().record()
"""What a file written before these keys existed means: truncation, no cleaning."""


# --- clean_html -----------------------------------------------------------------------------------

_BLOCK_TAGS = "br|p|hr|div|li|ul|ol|h[1-6]|blockquote|tr|td|th|table"
_INLINE_TAGS = "i|em|b|strong|u|span|a|font|small|big|sub|sup|s|strike"
# a tag of these names only (with attributes, closing or self-closing): `<grin>`, `<SPOILER>` or an
# unclosed `<sp?) ... <br />` stay text
_BLOCK = re.compile(rf"(?:\s*</?(?:{_BLOCK_TAGS})(?:\s[^<>]*)?/?>\s*)+", re.IGNORECASE)
_INLINE = re.compile(rf"</?(?:{_INLINE_TAGS})(?:\s[^<>]*)?/?>", re.IGNORECASE)
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|amp|lt|gt|quot|apos|nbsp);")


def clean_html(text: str) -> str:
    """`data.clean_html` (see config.py): block tags and the whitespace around them become one space,
    inline tags go, basic character references are decoded; ASCII whitespace at the ends is stripped."""
    text = _BLOCK.sub(" ", text)
    text = _INLINE.sub("", text)
    text = _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
    return text.strip(" \t\n\r\f\v")


def has_markup(text: str) -> bool:
    """Whether `clean_html` would change `text` beyond its outer whitespace (a tag or a character
    reference it removes or decodes)."""
    return bool(_BLOCK.search(text) or _INLINE.search(text) or _ENTITY.search(text))


def prepare_texts(texts: Sequence[str], settings: LongText) -> list[str]:
    return [clean_html(t) for t in texts] if settings.clean_html else list(texts)


# --- tokenizing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Specials:
    """The special tokens a tokenizer puts around one text: `prefix` and `suffix` per model input."""

    prefix: dict[str, list[int]]
    suffix: dict[str, list[int]]

    @property
    def count(self) -> int:
        return len(self.prefix["input_ids"]) + len(self.suffix["input_ids"])


def special_tokens(tokenizer: Any) -> Specials:
    """Find what the tokenizer adds around a single text (e.g. BERT's [CLS] ... [SEP], none for GPT-2)
    by tokenizing a probe with and without special tokens. Raises ConfigError for a tokenizer that
    puts them inside the text."""
    probe = "a b"
    full = tokenizer(probe)
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    ids = full["input_ids"]
    for start in range(len(ids) - len(bare) + 1):
        if ids[start : start + len(bare)] == bare:
            end = start + len(bare)
            keys = [k for k in MODEL_INPUTS if k in full]
            return Specials({k: list(full[k][:start]) for k in keys}, {k: list(full[k][end:]) for k in keys})
    raise ConfigError(
        f"{type(tokenizer).__name__} does not put its special tokens around a text: data.long_text="
        "head_tail and chunk cannot cut its inputs; use data.long_text=truncate"
    )


def head_count(budget: int, head_tokens: int | None) -> int:
    """Tokens a cut text keeps from its start under head_tail: `head_tokens`, else a quarter of the
    budget rounded up, never more than the budget."""
    return min(budget, head_tokens if head_tokens is not None else math.ceil(budget / 4))


def window_starts(length: int, width: int, overlap: int, max_chunks: int) -> tuple[list[int], int]:
    """(start of each kept window, number of windows the whole text needs) for `length` content tokens
    in windows of `width` sharing `overlap` with the one before; the last window ends at the end. Beyond
    `max_chunks`, the first max_chunks - 1 windows and the last are kept."""
    if length <= width:
        return [0], 1
    step = width - overlap
    needed = math.ceil((length - width) / step) + 1
    starts = [k * step for k in range(needed - 1)] + [length - width]
    if needed > max_chunks:
        starts = starts[: max_chunks - 1] + starts[-1:]
    return starts, needed


def windows_needed(content: np.ndarray, width: int, overlap: int) -> np.ndarray:
    """`window_starts`' count, vectorized over content lengths."""
    step = width - overlap
    over = np.maximum(content - width, 0)
    return np.where(content <= width, 1, np.ceil(over / step).astype(np.int64) + 1)


def budget_of(settings: LongText, specials: Specials) -> int:
    """Content tokens per input; raises ConfigError when max_length leaves none (or no window step)."""
    budget = settings.max_length - specials.count
    if budget < 1 or (settings.chunked and budget - settings.chunk_stride < 1):
        raise ConfigError(
            f"data.max_length={settings.max_length} leaves {budget} token(s) beside the {specials.count} "
            f"special tokens{' and the chunk_stride overlap' if settings.chunked else ''}: raise data.max_length"
        )
    return budget


def encode_batch(
    tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None, settings: LongText
) -> dict[str, list]:
    """Tokenize a batch of texts as `settings` says, without padding: the model inputs of each row (a
    list of windows each under `chunk`) and `length`, its real tokens (all windows together); under
    head_tail and chunk also FULL_LENGTH, and under chunk WINDOWS."""
    texts = prepare_texts(texts, settings)
    if settings.mode == TRUNCATE:
        if pairs is not None and settings.clean_html:
            pairs = prepare_texts(pairs, settings)
        out = dict(tokenizer(texts, pairs, truncation=True, max_length=settings.max_length))
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out
    specials = special_tokens(tokenizer)
    budget = budget_of(settings, specials)
    full = tokenizer(texts, verbose=False)  # whole texts: the cut is made below
    keys = [k for k in MODEL_INPUTS if k in full and k in specials.prefix]
    p, q = len(specials.prefix["input_ids"]), len(specials.suffix["input_ids"])
    out: dict[str, list] = {k: [] for k in keys}
    if settings.chunked:
        out.pop("attention_mask", None)  # all ones: the collator makes it from the lengths
    out["length"], out[FULL_LENGTH] = [], []
    if settings.chunked:
        out[WINDOWS] = []
    head = head_count(budget, settings.head_tokens)
    for row in range(len(texts)):
        n = len(full["input_ids"][row])
        content = n - p - q
        if settings.chunked:
            starts, _ = window_starts(content, budget, settings.chunk_stride, settings.max_chunks)
            spans = [[(p + s, p + min(s + budget, content))] for s in starts]
        elif content <= budget:
            spans = [[(p, p + content)]]
        else:
            tail = budget - head
            spans = [[(p, p + head)] + ([(p + content - tail, p + content)] if tail else [])]
        inputs = {k: [_join(specials, k, full[k][row], window) for window in spans] for k in keys}
        for k in keys:
            if k in out:
                out[k].append(inputs[k] if settings.chunked else inputs[k][0])
        out["length"].append(sum(len(w) for w in inputs["input_ids"]))
        out[FULL_LENGTH].append(n)
        if settings.chunked:
            out[WINDOWS].append(len(spans))
    return out


def model_rows(input_ids: list[Any], chunked: bool) -> tuple[list[list[int]], list[int]]:
    """The rows a model reads from `encode_batch`'s input_ids (every window under chunk), and the
    number of the text each came from."""
    if not chunked:
        return input_ids, list(range(len(input_ids)))
    rows = [window for windows in input_ids for window in windows]
    return rows, [i for i, windows in enumerate(input_ids) for _ in windows]


def _join(specials: Specials, key: str, values: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """One model input: the special tokens around the given spans of a whole text's `values`."""
    joined = list(specials.prefix[key])
    for start, end in spans:
        joined += values[start:end]
    return joined + specials.suffix[key]


# --- batching -------------------------------------------------------------------------------------


def is_chunked(row: dict[str, Any]) -> bool:
    """Whether a dataset row holds a document's windows (a list of id lists) rather than one input."""
    ids = row["input_ids"]
    return len(ids) > 0 and isinstance(ids[0], (list, tuple, np.ndarray))


def _pad(sequences: list[Any], longest: int, fill: int) -> torch.Tensor:
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    padded = np.full((len(sequences), longest), fill, dtype=np.int64)
    padded[np.arange(longest) < lengths[:, None]] = np.concatenate(
        [np.asarray(s, dtype=np.int64) for s in sequences]
    )
    return torch.from_numpy(padded)


def collate_windows(
    rows: list[dict[str, Any]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """A batch of whole documents: every window of every row as one padded model input, `doc` (the
    row of each window), and `labels` and `idx` per document (when the rows have them). A row that is
    one input (not chunked) is a document of one window."""
    docs = [r["input_ids"] if is_chunked(r) else [r["input_ids"]] for r in rows]
    windows = [w for d in docs for w in d]
    longest = max(len(w) for w in windows)
    if pad_to_multiple_of:
        longest = int(math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of)
    batch: dict[str, torch.Tensor] = {"input_ids": _pad(windows, longest, pad_token_id)}
    lengths = torch.tensor([len(w) for w in windows])
    batch["attention_mask"] = (torch.arange(longest) < lengths[:, None]).long()
    if "token_type_ids" in rows[0]:
        types = [w for r in rows for w in (r["token_type_ids"] if is_chunked(r) else [r["token_type_ids"]])]
        batch["token_type_ids"] = _pad(types, longest, 0)
    batch[DOC] = torch.tensor([i for i, d in enumerate(docs) for _ in d], dtype=torch.long)
    if "labels" in rows[0]:
        labels = [r["labels"] for r in rows]
        batch["labels"] = torch.tensor(
            labels, dtype=torch.float32 if isinstance(labels[0], list) else torch.long
        )
    if "idx" in rows[0]:
        batch["idx"] = torch.tensor([r["idx"] for r in rows], dtype=torch.long)
    return batch


# --- pooling --------------------------------------------------------------------------------------


def pool_logits(logits: torch.Tensor, doc: torch.Tensor, num_docs: int, how: str) -> torch.Tensor:
    """Per-document logits (float32) from per-window ones: per class the `mean`, `max` or `logmeanexp`
    over the document's windows. A one-window document gets its window's logits exactly."""
    logits = logits.float()
    doc = doc.to(logits.device)
    shape = (num_docs, logits.shape[-1])
    if how == "mean":
        total = logits.new_zeros(shape).index_add(0, doc, logits)
        count = torch.bincount(doc, minlength=num_docs).clamp(min=1).to(logits.dtype)
        return total / count[:, None]
    index = doc[:, None].expand_as(logits)
    top = logits.new_full(shape, -math.inf).scatter_reduce(0, index, logits, reduce="amax")
    if how == "max":
        return top
    if how != "logmeanexp":
        raise ConfigError(f"data.chunk_pool={how!r} is not one of mean, max, logmeanexp")
    shift = top.detach()  # any constant per document gives the same value and gradient
    total = logits.new_zeros(shape).index_add(0, doc, (logits - shift[doc]).exp())
    count = torch.bincount(doc, minlength=num_docs).clamp(min=1).to(logits.dtype)
    return shift + torch.log(total / count[:, None])


@dataclass(frozen=True)
class Windows:
    """Which document each model input of a batch belongs to (`doc`, from collate_windows; None: one
    input per document), for pooling what the model gives per window into one value per document."""

    doc: torch.Tensor | None
    num_docs: int
    how: str

    def logits(self, values: torch.Tensor) -> torch.Tensor:
        """Per-window logits pooled as data.chunk_pool says; per-document ones (a logits cache) as they are."""
        if self.doc is None or values.shape[0] != self.doc.shape[0]:
            return values
        return pool_logits(values, self.doc, self.num_docs, self.how)

    def rows(self, values: torch.Tensor | None) -> torch.Tensor | None:
        """Per-window hidden states averaged per document."""
        if self.doc is None or values is None:
            return values
        return pool_rows(values, self.doc, self.num_docs)


def pool_rows(values: torch.Tensor, doc: torch.Tensor, num_docs: int) -> torch.Tensor:
    """The mean per document of per-window vectors (the pooled hidden states of hidden-state KD)."""
    return pool_logits(values, doc, num_docs, "mean")


# --- scoring raw texts ----------------------------------------------------------------------------


@torch.no_grad()  # not inference_mode: see evaluation.gather_logits (ZeRO-3)
def document_logits(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    settings: LongText,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    pairs: Sequence[str] | None = None,
    cast: Callable[[], Any] = contextlib.nullcontext,
) -> torch.Tensor:
    """The model's float32 logits for each text, in order, treated as `settings` says (cleaning, cut,
    windows and pooling as in training); `batch_size` counts texts. The texts are batched by length
    (sorted by characters) and put back in order. `cast()`: the context each forward runs in."""
    from scalelora.models import check_last_tokens

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]) + (len(pairs[i]) if pairs else 0))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = order[start : start + batch_size]
        encoded = encode_batch(
            tokenizer, [texts[i] for i in chunk], [pairs[i] for i in chunk] if pairs else None, settings
        )
        ids, text_of = model_rows(encoded["input_ids"], settings.chunked)
        # a row (or window) that ends in the pad token would be read one token early by a decoder
        check_last_tokens(
            ids, tokenizer.pad_token_id, tokenizer, lambda k, c=chunk, t=text_of: f"text {c[t[k]]}"
        )
        keys = [k for k in MODEL_INPUTS if k in encoded]
        rows = [{k: encoded[k][j] for k in keys} for j in range(len(chunk))]
        batch = collate_windows(rows, pad)
        doc = batch.pop(DOC)
        with cast():
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        out.append(pool_logits(logits, doc, len(chunk), settings.chunk_pool).cpu())
    if not out:
        return torch.zeros((0, 0))
    by_length = torch.cat(out)
    restored = torch.empty_like(by_length)
    restored[torch.tensor(order)] = by_length
    return restored


# --- what a run reports ---------------------------------------------------------------------------


def describe(tokenized: dict[str, Any], settings: LongText, tokenizer: Any) -> dict[str, Any] | None:
    """summary.json's `long_text`: the settings and, per split, how many texts were cut and how
    (head_tail: texts longer than max_length; chunk: windows, and texts beyond max_chunks with the
    windows they lost). None under truncate."""
    if settings.mode == TRUNCATE:
        return None
    specials = special_tokens(tokenizer).count
    budget = settings.max_length - specials
    splits: dict[str, Any] = {}
    for split, ds in tokenized.items():
        full = np.asarray(ds[FULL_LENGTH], dtype=np.int64)
        n = max(len(full), 1)
        entry: dict[str, Any] = {"documents": len(full)}
        if settings.chunked:
            kept = np.asarray(ds[WINDOWS], dtype=np.int64)
            needed = windows_needed(full - specials, budget, settings.chunk_stride)
            over = needed > settings.max_chunks
            entry.update(
                windows=int(kept.sum()),
                windows_per_document=float(kept.sum() / n),
                over_max_chunks=int(over.sum()),
                over_max_chunks_share=float(over.sum() / n),
                windows_dropped=int((needed - kept).sum()),
            )
        else:
            cut = full > settings.max_length
            entry.update(
                cut=int(cut.sum()),
                cut_share=float(cut.sum() / n),
                tokens_kept_share=float(np.minimum(full, settings.max_length).sum() / max(full.sum(), 1)),
            )
        splits["validation" if split == "eval" else split] = entry  # as summary.json's `eval` names it
    return {**settings.record(), "splits": splits}


def cut_label(settings: LongText | None) -> str:
    """What the tokenize step's count of texts not read whole counts, in the mode's words."""
    if settings is None or settings.mode == TRUNCATE:
        return "truncated"
    if settings.chunked:
        return f"over data.max_chunks={settings.max_chunks} windows"
    return f"cut to head and tail (over {settings.max_length} tokens)"


def counted(n: int, noun: str) -> str:
    """`n` and `noun`, plural unless n is one: "1 text", "14 texts"."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def log_lines(described: dict[str, Any] | None, settings: LongText, tokenizer: Any) -> list[str]:
    """The log line per split for `describe`'s numbers."""
    if described is None:
        return []
    budget = settings.max_length - special_tokens(tokenizer).count
    lines = []
    for split, e in described["splits"].items():
        if settings.chunked:
            line = (
                f"scalelora: long_text=chunk: {split}: {e['documents']:,} texts in {e['windows']:,} windows of up to "
                f"{settings.max_length} tokens ({e['windows_per_document']:.2f} per text)"
            )
            if e["over_max_chunks"]:
                line += (
                    f"; {counted(e['over_max_chunks'], 'text')} ({100 * e['over_max_chunks_share']:.2f}%) needed more "
                    f"than data.max_chunks={settings.max_chunks} windows: each kept its first {settings.max_chunks - 1} "
                    f"and its last ({counted(e['windows_dropped'], 'window')} dropped)"
                )
        else:
            head = head_count(budget, settings.head_tokens)
            line = (
                f"scalelora: long_text=head_tail: {split}: {e['cut']:,} of {e['documents']:,} texts "
                f"({100 * e['cut_share']:.1f}%) are longer than {settings.max_length} tokens: each keeps its "
                f"first {head} and last {budget - head} ({100 * e['tokens_kept_share']:.1f}% of all tokens kept)"
            )
        lines.append(line)
    return lines
