"""The dotted keys of the config tree, for tests that go over every key (fuzzing, docs coverage)."""

from __future__ import annotations

import dataclasses
import typing

from scalelora.config import RunConfig


def config_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree (a nested dataclass is a section, not a key)."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys
