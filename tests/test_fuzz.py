"""Fuzzing: any config text, override or data file gives a valid config / dataset or one ConfigError /
DataError (a UserError: the one-line `scalelora: error:` with exit code 2), never another exception."""

from __future__ import annotations

import csv
import io
import json
import math
import types
import typing
from pathlib import Path

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from scalelora.config import DataConfig, RunConfig, config_keys, key_info, load_config, to_dict
from scalelora.data import load_splits
from scalelora.errors import ConfigError, DataError

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


KEYS = config_keys()
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        ["auto", "fp16", "bf16", "no", "lora", "full", "1e-3", "[a,b]", "{a: 1}", "~", ".inf", "-1"]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=20), st.sampled_from(KEYS).map(lambda k: k + "x"))


def typed_value(hint: object) -> st.SearchStrategy:
    """Mostly values of the key's own type (so many configs are valid), sometimes a wrong one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[typed_value(a) for a in args if a is not type(None)], st.none())
    if origin is typing.Literal:
        return st.sampled_from([*args, "bogus"])
    if origin is list:
        return st.lists(st.sampled_from(["query", "value", "pos", "neg", "x"]), max_size=3)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(min_value=-2, max_value=64)
    if hint is float:
        return st.one_of(st.floats(min_value=-1, max_value=4), st.floats())
    return st.text(max_size=8)


def typed_pairs() -> st.SearchStrategy:
    return st.sampled_from(KEYS).flatmap(lambda key: st.tuples(st.just(key), typed_value(key_info(key).hint)))


def as_override(key: str, value: object) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def check_config(recipe: str, overrides: list[str]) -> None:
    try:
        config = load_config(recipe, overrides)
    except ConfigError as err:
        assert str(err).strip(), "an empty error message"
        event("ConfigError")
        return
    event("a valid config")
    assert isinstance(config, RunConfig)
    tree = to_dict(config)
    assert all(math.isfinite(v) for v in leaves(tree) if isinstance(v, float)), tree
    yaml.safe_dump(tree)  # a valid config can always be written back


def leaves(tree: object) -> list[object]:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in leaves(value)]
    if isinstance(tree, list):
        return [leaf for value in tree for leaf in leaves(value)]
    return [tree]


@FUZZ
@given(st.lists(st.tuples(keys, values), max_size=4))
def test_fuzzed_overrides_give_a_config_or_a_config_error(pairs):
    overrides = [
        f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
        for key, value in pairs
    ]
    check_config("quickstart", overrides)


@FUZZ
@given(st.lists(typed_pairs(), max_size=4))
def test_fuzzed_typed_overrides_give_a_config_or_a_config_error(pairs):
    check_config("quickstart", [as_override(key, value) for key, value in pairs])


@FUZZ
@given(st.lists(st.text(max_size=30), max_size=4))
def test_fuzzed_raw_override_strings_give_a_config_or_a_config_error(overrides):
    check_config("quickstart", overrides)


@FUZZ
@given(
    st.one_of(
        st.text(max_size=200), st.dictionaries(keys, values, max_size=5).map(lambda d: yaml.safe_dump(d))
    )
)
def test_fuzzed_recipe_files_give_a_config_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("recipe") / "fuzzed.yaml"
    path.write_bytes(text.encode("utf-8", errors="replace"))
    check_config(str(path), [])


# --- data -----------------------------------------------------------------------------------------------

labels = st.one_of(
    st.sampled_from(["pos", "neg", "meh"]),
    st.integers(min_value=-2, max_value=4),
    st.floats(allow_nan=True),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.text(max_size=4),
)
texts = st.one_of(st.text(max_size=20), st.none(), st.integers(), st.just(""), st.just("   "))
good_row = st.fixed_dictionaries(
    {"text": st.text(min_size=1, max_size=20).filter(str.strip), "label": st.sampled_from(["pos", "neg"])}
)
odd_row = st.dictionaries(
    st.sampled_from(["text", "label", "other"]), st.one_of(texts, labels), min_size=0, max_size=3
)
# mostly well-formed rows, so both outcomes (a dataset, an error) are explored
rows = st.lists(st.one_of(*[good_row] * 8, odd_row), min_size=1, max_size=8)
junk_lines = st.lists(
    st.one_of(st.text(max_size=20), st.just("{"), st.just("[1, 2]"), st.just('"x"')), max_size=1
).flatmap(lambda junk: st.sampled_from([[], [], junk]))


def write_split(folder: Path, split: str, fmt: str, split_rows: list[dict], junk: list[str]) -> None:
    if fmt == "jsonl":
        lines = [json.dumps(r) for r in split_rows] + junk
        (folder / f"{split}.jsonl").write_bytes("\n".join(lines).encode("utf-8", errors="replace"))
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["text", "label"])
    for row in split_rows:
        writer.writerow([row.get("text", ""), row.get("label", "")])
    buffer.write("\n".join(junk))
    (folder / f"{split}.csv").write_bytes(buffer.getvalue().encode("utf-8", errors="replace"))


def check_data(folder: Path, **overrides: object) -> None:
    try:
        splits = load_splits(DataConfig(path=str(folder), test_split=None, **overrides), seed=0)
    except DataError as err:
        assert str(err).strip()
        event(f"DataError: {str(err).split(': ')[-1][:40]}")
        return
    event("a valid dataset")
    assert len(splits.train) > 0 and len(splits.eval) > 0
    assert set(splits.train["label"]) <= set(range(len(splits.label_names)))
    assert set(splits.eval["label"]) <= set(range(len(splits.label_names)))


@FUZZ
@given(st.sampled_from(["jsonl", "csv"]), rows, rows, junk_lines, st.booleans())
def test_fuzzed_data_files_give_a_dataset_or_a_data_error(
    tmp_path_factory, fmt, train_rows, eval_rows, junk, drop_empty
):
    folder = tmp_path_factory.mktemp("data")
    write_split(folder, "train", fmt, train_rows, junk)
    write_split(folder, "validation", fmt, eval_rows, [])
    check_data(folder, drop_empty=drop_empty)


@FUZZ
@given(st.binary(max_size=200), st.sampled_from(["jsonl", "csv"]))
def test_fuzzed_bytes_give_a_dataset_or_a_data_error(tmp_path_factory, raw, fmt):
    folder = tmp_path_factory.mktemp("bytes")
    (folder / f"train.{fmt}").write_bytes(raw)
    write_split(folder, "validation", fmt, [{"text": "fine", "label": "pos"}], [])
    check_data(folder)
