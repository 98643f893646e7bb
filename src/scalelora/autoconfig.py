"""The default for a user's own data (`--config auto`, or no `--config` at all): settings chosen from the
data itself (number of classes, training size, token lengths, label skew), each logged with its reason.

A key the user sets on the command line is never changed. The rules are deliberately few and stated
in full below, so a user can predict them; `docs/results.md` reports how they do on the shipped data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from scalelora.config import RunConfig

# Training-set size at which one epoch is enough; smaller sets get proportionally more epochs (1..10).
EXAMPLES_PER_RUN = 50_000
# Examples between evaluations (and checkpoints) when one epoch holds more: counted in optimizer steps,
# never in wall time, so which checkpoint is kept does not depend on the machine.
EXAMPLES_PER_EVAL = 50_000
# The token lengths come from a seeded sample of at most this many training texts (every text of a
# smaller set): the 99th percentile of 100,000 is within a fraction of a token of the whole set's.
LENGTH_SAMPLE_ROWS = 100_000
# Label skew (largest class / smallest class) from which the loss weights classes by inverse frequency.
SKEW_FOR_CLASS_WEIGHTS = 3.0
MANY_CLASSES = 10
LENGTH_QUANTILE = 99.0
MAX_LENGTH_BOUNDS = (32, 256)
# Long documents: above this share of training texts longer than the max_length chosen within
# MAX_LENGTH_BOUNDS, a long-text mode is chosen, and max_length may rise to the model's limit (or to
# LONG_TEXT_LIMIT where the tokenizer states none).
LONG_TEXT_SHARE = 0.10
# ... head_tail when at most this share is longer than that limit (one input per text; Sun et al. 2019
# found head + tail best on IMDB, where 15% of reviews exceed 512 tokens); chunk above it, where cutting
# the middle would lose much of too many texts.
CHUNK_SHARE = 0.25
LONG_TEXT_LIMIT = 512
# Markup: above this share of training texts carrying the HTML that data.clean_html removes (`<br />`,
# `<i>`, `&amp;`, ...: longtext.has_markup), it is cleaned; the token lengths are then measured on the
# cleaned texts, as the run reads them. Of the shipped sets only imdb has any (59% of its reviews).
MARKUP_SHARE = 0.01
# The version of the rules below. The default rows of the results study record it: a rule that changes
# what is chosen for some data changes no config key, so the rows compare this instead. Raise it with
# every change to `choose` that can change a choice.
RULES_VERSION = 3
# 2: eval.every and checkpoint.every every ~EXAMPLES_PER_EVAL examples when an epoch is longer; token
#    lengths measured untruncated on a sample of at most LENGTH_SAMPLE_ROWS texts (1 measured every text,
#    cut at the model's limit); data.long_text (truncate, head_tail, chunk) from the share of texts over
#    the max_length chosen, and max_length up to the model's limit under a long-text mode
# 3: data.clean_html from the share of training texts with markup (MARKUP_SHARE), the lengths measured on
#    the cleaned texts: it changes nothing for data without markup (RULE_CHANGES says which data each
#    version's change reaches, so a row on other data is not called out of date by it)
# Every key `choose` may set (what the data decides rather than the recipe).
CHOSEN_KEYS = (
    "data.max_length",
    "data.long_text",
    "data.clean_html",
    "lora.target_modules",
    "lora.r",
    "lora.alpha",
    "train.head_lr",
    "train.epochs",
    "train.class_weights",
    "eval.every",
    "checkpoint.every",
)


@dataclass
class Choice:
    key: str
    value: Any
    reason: str


def length_cap(lengths: np.ndarray, limit: int | None, long_text: bool = False) -> tuple[int, float]:
    """(max_length, the 99th percentile it came from): the percentile rounded up to a multiple of 8,
    kept within MAX_LENGTH_BOUNDS and the model's position limit; with `long_text` (a long-text mode)
    the upper bound is the model's limit (LONG_TEXT_LIMIT where it states none)."""
    quantile = float(np.percentile(lengths, LENGTH_QUANTILE)) if len(lengths) else float(MAX_LENGTH_BOUNDS[0])
    low, high = MAX_LENGTH_BOUNDS
    if long_text:
        high = limit or LONG_TEXT_LIMIT
    elif limit is not None:
        high = min(high, limit)
    return int(min(max(8 * math.ceil(quantile / 8), low), high)), quantile


def length_reason(
    lengths: np.ndarray, num_train: int, max_length: int, quantile: float, limit: int | None
) -> str:
    """Why `max_length`: the real percentile (of every text, or of the sample), and when a bound cut it
    below the percentile, which bound and the share of texts that will be truncated."""
    texts = (
        f"the {num_train:,} training texts"
        if len(lengths) >= num_train
        else f"a seeded sample of {len(lengths):,} of the {num_train:,} training texts"
    )
    reason = f"99% of {texts} have at most {quantile:,.0f} tokens"
    if max_length >= quantile:
        return reason
    bound = (
        f"the model's {limit} positions"
        if limit is not None and max_length == limit
        else f"the auto default's bound {MAX_LENGTH_BOUNDS[1]} (attention costs grow with length squared)"
    )
    longer = float(np.mean(lengths > max_length)) if len(lengths) else 0.0
    return f"{reason}; capped at {bound}, so {100 * longer:.1f}% of them are longer and will be truncated"


def eval_interval(num_train: int, examples_per_step: int) -> tuple[int, int] | None:
    """(steps between evaluations and checkpoints, steps per epoch) when one epoch holds more than about
    EXAMPLES_PER_EVAL examples; None when evaluating once per epoch is often enough."""
    steps_per_epoch = max(1, math.ceil(num_train / max(examples_per_step, 1)))
    interval = max(1, round(EXAMPLES_PER_EVAL / max(examples_per_step, 1)))
    return (interval, steps_per_epoch) if steps_per_epoch > interval else None


def sample_table(train: Any) -> Any:
    """Every training row (an Arrow table), or a seeded sample of LENGTH_SAMPLE_ROWS of them on a larger set
    (a table already sampled is its own sample: markup_share and length_sample take either)."""
    from scalelora import data as data_lib

    table = data_lib.arrow_table(train)
    rows = data_lib.seeded_subset(table.num_rows, LENGTH_SAMPLE_ROWS, seed=0)
    return table.take(np.sort(rows)) if rows is not None else table


def markup_share(train: Any) -> float:
    """The share of the sampled training texts (a pair counts once) carrying markup data.clean_html removes."""
    from scalelora import longtext

    table = sample_table(train)
    columns = [c for c in ("text", "text_pair") if c in table.column_names]
    marked = sum(
        any(isinstance(t, str) and longtext.has_markup(t) for t in row)
        for row in zip(*(table.column(c).to_pylist() for c in columns), strict=True)
    )
    return marked / max(table.num_rows, 1)


def reads_markup(data: Any, explicit: set[str], share: float) -> bool:
    """Whether the run cleans markup: `data.clean_html` as the user set it, else whether more than
    MARKUP_SHARE of the sample carries markup (`share`: markup_share)."""
    return bool(data.clean_html) if "data.clean_html" in explicit else share > MARKUP_SHARE


def length_sample(train: Any, tokenizer: Any, clean_html: bool = False) -> np.ndarray:
    """Untruncated token lengths (special tokens included) of every training text, or of a seeded sample
    of LENGTH_SAMPLE_ROWS of them on a larger set; with `clean_html`, of the texts as data.clean_html
    cleans them (as the run reads them)."""
    from scalelora import longtext, tokens

    table = sample_table(train)
    texts = table.column("text").to_pylist()
    pairs = table.column("text_pair").to_pylist() if "text_pair" in table.column_names else None
    if clean_html:
        texts = [longtext.clean_html(t) for t in texts]
        pairs = [longtext.clean_html(t) for t in pairs] if pairs is not None else None
    return tokens.token_lengths(tokenizer, texts, pairs)


@dataclass
class LengthSample:
    """What the auto default measures on the training texts (a seeded sample of a larger set): their
    untruncated token lengths as the run reads them, and the share carrying markup (markup_share)."""

    lengths: np.ndarray
    markup: float


def measure(train: Any, tokenizer: Any, data: Any, explicit: set[str]) -> LengthSample:
    """The LengthSample of `train`: the lengths of the texts cleaned when the run will clean them
    (reads_markup: `data.clean_html` as the user set it, else the markup share decides)."""
    sample = sample_table(train)  # drawn once for both measures
    share = markup_share(sample)
    return LengthSample(length_sample(sample, tokenizer, reads_markup(data, explicit, share)), share)


def has_markup_data(train: Any) -> bool:
    """Version 3's scope: training data on which the markup rule chooses data.clean_html=true."""
    return markup_share(train) > MARKUP_SHARE


# The data a version's change reaches, for versions whose change can alter choices on some data only
# (a version not named here reaches all data).
RULE_SCOPES = {3: has_markup_data}


def rule_changes_reaching(then: int, train: Any) -> list[int]:
    """The rule versions after `then` (to RULES_VERSION) whose change can alter a choice for this
    training data (None: data not at hand, every version counts): a row chosen under `then` is out of
    date only when one does."""
    return [
        v
        for v in range(then + 1, RULES_VERSION + 1)
        if v not in RULE_SCOPES or train is None or RULE_SCOPES[v](train)
    ]


def clean_html_choice(share: float, sampled: int) -> Choice:
    """`data.clean_html` from the share of `sampled` training texts with markup (markup_share)."""
    said = f"{100 * share:.1f}% of {sampled:,} training texts carry HTML markup"
    if share > MARKUP_SHARE:
        return Choice(
            "data.clean_html",
            True,
            f"{said} (`<br />`, `<i>`, `&amp;`, ...; over {100 * MARKUP_SHARE:.0f}%): removed before tokenizing, "
            "in training and predict alike, and the lengths above measured without it",
        )
    return Choice(
        "data.clean_html", False, f"{said} (at most {100 * MARKUP_SHARE:.0f}%): texts read as written"
    )


def long_text_choice(full_lengths: np.ndarray, short_cap: int, long_cap: int) -> Choice:
    """`data.long_text` from the whole texts' token counts: truncate while at most LONG_TEXT_SHARE of them
    are longer than `short_cap` (the max_length chosen within MAX_LENGTH_BOUNDS); else head_tail while at
    most CHUNK_SHARE are longer than `long_cap` (the model's limit), chunk beyond."""
    n = max(len(full_lengths), 1)
    over_short = float((full_lengths > short_cap).sum() / n)
    over_long = float((full_lengths > long_cap).sum() / n)
    said = f"{100 * over_short:.1f}% of the {len(full_lengths):,} training texts are longer than {short_cap} tokens"
    if over_short <= LONG_TEXT_SHARE:
        return Choice(
            "data.long_text",
            "truncate",
            f"{said} (at most {100 * LONG_TEXT_SHARE:.0f}%): cutting them costs little",
        )
    said += (
        f" (over {100 * LONG_TEXT_SHARE:.0f}%); {100 * over_long:.1f}% are longer than the model's {long_cap}"
    )
    if over_long <= CHUNK_SHARE:
        return Choice(
            "data.long_text",
            "head_tail",
            f"{said} (at most {100 * CHUNK_SHARE:.0f}%): one input of up to {long_cap} tokens per text, a longer "
            "one keeping its first and last tokens",
        )
    return Choice(
        "data.long_text",
        "chunk",
        f"{said} (over {100 * CHUNK_SHARE:.0f}%): every text read in windows of up to {long_cap} tokens",
    )


def choose(
    num_train: int,
    label_counts: np.ndarray,
    lengths: np.ndarray,
    position_limit: int | None,
    user_rank: int | None = None,
    multi_label: bool = False,
    examples_per_step: int = 32,
    full_lengths: np.ndarray | None = None,
    user_long_text: str | None = None,
    markup: tuple[float, int] | None = None,
) -> list[Choice]:
    """Every setting the auto default picks for data of this shape, with the reason for each
    (`lengths`: untruncated token lengths of the training texts or of a sample of them; `user_rank`: a
    `lora.r` the user set, which `lora.alpha` follows; `examples_per_step`: the global batch;
    `full_lengths`: the whole texts' token counts, which decide `data.long_text` (None: texts with a
    pair, which the long-text modes do not read); `user_long_text`: a mode the user set, which
    `data.max_length` follows; `markup`: (markup_share, texts sampled), which decides data.clean_html)."""
    from scalelora.data import CLASS_WEIGHT_MAX_RATIO  # lazily: importing data.py imports torch

    k = len(label_counts)
    seen = label_counts[label_counts > 0]
    skew = float(seen.max() / seen.min()) if len(seen) else 1.0
    max_length, quantile = length_cap(lengths, position_limit)
    long_choice = None
    if full_lengths is not None:
        long_cap = position_limit or LONG_TEXT_LIMIT
        long_choice = long_text_choice(full_lengths, max_length, long_cap)
    long_mode = user_long_text or (long_choice.value if long_choice is not None else "truncate")
    length_why = length_reason(lengths, num_train, max_length, quantile, position_limit)
    if long_mode != "truncate":
        # lengths are untruncated (length_sample): under a long-text mode max_length may rise to the limit
        max_length, quantile = length_cap(lengths, position_limit, long_text=True)
        length_why = (
            f"{length_reason(lengths, num_train, max_length, quantile, position_limit).split(';')[0]}; "
            f"up to {max_length} (the model's limit) under data.long_text={long_mode}, which reads a longer "
            "text as that mode says"
        )
    epochs = int(min(10, max(1, math.ceil(EXAMPLES_PER_RUN / max(num_train, 1)))))
    rank = 16 if (k > MANY_CLASSES or num_train > 20_000) else 8
    choices = [
        Choice(
            "data.max_length",
            max_length,
            length_why,
        ),
        Choice(
            "lora.target_modules",
            ["all-linear"],
            "adapting every linear layer (attention and feed-forward) learns new tasks better than "
            "attention projections alone, for a few % of the parameters",
        ),
        Choice(
            "lora.r",
            rank,
            f"{k} classes and {num_train:,} examples"
            + (" need more adapter capacity" if rank == 16 else " are served by a small adapter"),
        ),
        Choice(
            "lora.alpha",
            2.0 * (user_rank or rank),
            "alpha = 2 r keeps the update scale of the usual r=8, alpha=16",
        ),
        Choice(
            "train.head_lr",
            5e-3 if k > MANY_CLASSES else 3e-3,
            "the classification head starts from random weights"
            + (f" and has {k} outputs to learn" if k > MANY_CLASSES else ""),
        ),
        Choice(
            "train.epochs",
            epochs,
            f"about {EXAMPLES_PER_RUN:,} example visits in all for {num_train:,} training examples; "
            f"evaluated every epoch (every ~{EXAMPLES_PER_EVAL:,} examples on larger sets), the best evaluation "
            "is kept and 2 without progress stop the run",
        ),
    ]
    cadence = eval_interval(num_train, examples_per_step)
    if cadence is not None:
        interval, steps_per_epoch = cadence
        why = (
            f"one epoch is {steps_per_epoch:,} steps of {examples_per_step} examples: every {interval:,} steps "
            f"(about {interval * examples_per_step:,} examples)"
        )
        choices.append(Choice("eval.every", interval, f"{why}, not only at the end of the epoch"))
        choices.append(
            Choice(
                "checkpoint.every", interval, f"{why}, so a run stopped by anything loses at most that much"
            )
        )
    if long_choice is not None:
        choices.append(long_choice)
    if markup is not None:
        choices.append(clean_html_choice(*markup))
    if multi_label:
        choices.append(
            Choice(
                "train.class_weights",
                "none",
                "multi-label: per-label pos_weight (negatives / positives) would weigh rare labels by "
                f"up to {max(num_train / max(int(seen.min()), 1) - 1, 1):.0f}x; thresholds tuned on validation serve them instead",
            )
        )
    elif skew >= SKEW_FOR_CLASS_WEIGHTS:
        choices.append(
            Choice(
                "train.class_weights",
                "balanced",
                f"the largest class is {skew:.1f}x the smallest: weigh classes by inverse frequency"
                + (f" (bounded at {CLASS_WEIGHT_MAX_RATIO:g}x)" if skew > CLASS_WEIGHT_MAX_RATIO else ""),
            )
        )
    else:
        choices.append(
            Choice("train.class_weights", "none", f"the classes are balanced enough ({skew:.1f}x at most)")
        )
    return choices


def choose_from_data(
    cfg: RunConfig, splits: Any, sample: LengthSample, tokenizer: Any, num_processes: int
) -> list[str]:
    """The `auto` recipe: pick the data-dependent settings for these splits (`sample`: `measure`'s),
    set them on `cfg` unless the user set them, and return the log lines."""
    from scalelora import data as data_lib

    model_limit = getattr(tokenizer, "model_max_length", None)
    limit = model_limit if isinstance(model_limit, int) and 0 < model_limit <= 100_000 else None
    explicit = cfg.explicit_keys
    lengths = sample.lengths
    choices = choose(
        len(splits.train),
        data_lib.label_counts(splits.train, len(splits.label_names)),
        np.asarray(lengths),
        limit,
        user_rank=cfg.lora.r if "lora.r" in explicit else None,
        multi_label=splits.problem_type == data_lib.MULTI_LABEL,
        examples_per_step=cfg.train.batch_size * cfg.train.grad_accum * num_processes,
        # the long-text modes read single texts: a text pair is truncated
        full_lengths=None if cfg.data.text_pair_column is not None else np.asarray(lengths),
        user_long_text=cfg.data.long_text if "data.long_text" in explicit else None,
        markup=(sample.markup, len(lengths)),
    )
    return apply(cfg, choices, explicit)


def apply(cfg: RunConfig, choices: list[Choice], explicit: set[str]) -> list[str]:
    """Set each chosen value on `cfg` unless the user set that key; return the log lines."""
    lines = []
    for choice in choices:
        if choice.key in explicit:
            lines.append(f"scalelora: auto: {choice.key} kept as you set it")
            continue
        section, name = choice.key.split(".")
        setattr(getattr(cfg, section), name, choice.value)
        shown = ",".join(choice.value) if isinstance(choice.value, list) else choice.value
        lines.append(f"scalelora: auto: {choice.key}={shown} ({choice.reason})")
    return lines
