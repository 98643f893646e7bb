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
# Label skew (largest class / smallest class) from which the loss weights classes by inverse frequency.
SKEW_FOR_CLASS_WEIGHTS = 3.0
MANY_CLASSES = 10
LENGTH_QUANTILE = 99.0
MAX_LENGTH_BOUNDS = (32, 256)
# The version of the rules below. The default rows of the results study record it: a rule that changes
# what is chosen for some data changes no config key, so the rows compare this instead. Raise it with
# every change to `choose` that can change a choice.
RULES_VERSION = 1
# Every key `choose` may set (what the data decides rather than the recipe).
CHOSEN_KEYS = (
    "data.max_length",
    "lora.target_modules",
    "lora.r",
    "lora.alpha",
    "train.head_lr",
    "train.epochs",
    "train.class_weights",
)


@dataclass
class Choice:
    key: str
    value: Any
    reason: str


def length_cap(lengths: np.ndarray, limit: int | None) -> tuple[int, float]:
    """(max_length, the 99th percentile it came from): the percentile rounded up to a multiple of 8,
    kept within MAX_LENGTH_BOUNDS and the model's position limit."""
    quantile = float(np.percentile(lengths, LENGTH_QUANTILE)) if len(lengths) else float(MAX_LENGTH_BOUNDS[0])
    low, high = MAX_LENGTH_BOUNDS
    if limit is not None:
        high = min(high, limit)
    return int(min(max(8 * math.ceil(quantile / 8), low), high)), quantile


def choose(
    num_train: int,
    label_counts: np.ndarray,
    lengths: np.ndarray,
    position_limit: int | None,
    user_rank: int | None = None,
    multi_label: bool = False,
) -> list[Choice]:
    """Every setting the auto default picks for data of this shape, with the reason for each
    (`user_rank`: a `lora.r` the user set, which `lora.alpha` follows)."""
    k = len(label_counts)
    seen = label_counts[label_counts > 0]
    skew = float(seen.max() / seen.min()) if len(seen) else 1.0
    max_length, quantile = length_cap(lengths, position_limit)
    epochs = int(min(10, max(1, math.ceil(EXAMPLES_PER_RUN / max(num_train, 1)))))
    rank = 16 if (k > MANY_CLASSES or num_train > 20_000) else 8
    choices = [
        Choice(
            "data.max_length",
            max_length,
            f"99% of the {num_train:,} training texts have at most {quantile:.0f} tokens",
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
            "evaluated every epoch, the best epoch is kept and 2 without progress stop the run",
        ),
    ]
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
                f"the largest class is {skew:.1f}x the smallest: weigh classes by inverse frequency",
            )
        )
    else:
        choices.append(
            Choice("train.class_weights", "none", f"the classes are balanced enough ({skew:.1f}x at most)")
        )
    return choices


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
