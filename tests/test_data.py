"""Label maps, filtering, sampling and batching on small local folders and the real data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_jsonl
from scalelora.config import DataConfig
from scalelora.data import (
    LengthGroupedSampler,
    PadCollator,
    SeededRandomSampler,
    class_weights,
    infer_label_names,
    load_splits,
)
from scalelora.errors import ConfigError, DataError


def folder_with(
    tmp_path: Path, train: list[dict], validation: list[dict] | None = None, labels: list | None = None
) -> Path:
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "validation.jsonl", validation if validation is not None else train)
    if labels is not None:
        (folder / "labels.json").write_text(json.dumps(labels))
    return folder


def rows(*pairs):
    return [{"text": t, "label": lab} for t, lab in pairs]


def test_label_map_from_labels_json_keeps_its_order(tmp_path):
    folder = folder_with(tmp_path, rows(("a", "pos"), ("b", "neg")), labels=["pos", "neg"])
    splits = load_splits(DataConfig(path=str(folder), test_split=None), seed=0)
    assert splits.label_names == ["pos", "neg"]
    assert list(splits.train["label"]) == [0, 1]


def test_label_map_from_sorted_training_labels_without_labels_json(tmp_path):
    folder = folder_with(tmp_path, rows(("a", "zebra"), ("b", "apple"), ("c", "mango")))
    splits = load_splits(DataConfig(path=str(folder), test_split=None), seed=0)
    assert splits.label_names == ["apple", "mango", "zebra"]


def test_integer_labels_give_k_classes_never_one_per_object():
    # distinct numpy scalars are distinct objects: a set() of them would be 16,000 classes
    labels = [np.int64(i % 6) for i in range(16_000)]
    assert infer_label_names(labels) == ["0", "1", "2", "3", "4", "5"]


def test_real_emotion_has_six_labels_and_all_splits():
    splits = load_splits(DataConfig(path="emotion"), seed=0)
    assert splits.label_names == ["sadness", "joy", "love", "anger", "fear", "surprise"]
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (16000, 2000, 2000)
    assert Counter(splits.train["label"])[1] == 5362  # joy, as the data README counts


def test_keep_labels_filters_and_renumbers_in_the_given_order():
    cfg = DataConfig(path="tamilmix_fire2020", keep_labels=["Positive", "Negative"])
    splits = load_splits(cfg, seed=0)
    assert splits.label_names == ["Positive", "Negative"]
    assert Counter(splits.train["label"]) == {0: 7627, 1: 1448}


def test_max_train_samples_is_a_seeded_random_subset_not_the_first_rows():
    # rotten_tomatoes is grouped by label: the first 200 rows are all 'pos'
    a = load_splits(DataConfig(path="rotten_tomatoes", max_train_samples=200), seed=1)
    b = load_splits(DataConfig(path="rotten_tomatoes", max_train_samples=200), seed=1)
    assert len(a.train) == 200 and set(a.train["label"]) == {0, 1}
    assert list(a.train["idx"]) == list(b.train["idx"])
    assert a.fingerprints["train"] == b.fingerprints["train"]


@pytest.mark.parametrize(
    ("train", "validation", "labels", "message"),
    [
        (
            rows(("a", "pos"), ("b", "neg")),
            rows(("c", "meh")),
            None,
            r"split 'validation' row 0: label 'meh' is not in the label map",
        ),
        (rows(("a", 0), ("b", 1)), rows(("c", 0.5)), None, r"label 0.5 in column 'label' is not an integer"),
        # integer labels are ids into a given label map (labels.json); without one they are values
        (rows(("a", 0), ("b", 1)), rows(("c", 7)), ["neg", "pos"], r"label 7 is out of range for 2 labels"),
        (
            rows(("a", "pos"), ("", "neg")),
            None,
            None,
            r"split 'train' row 1: empty text .* data\.drop_empty=true",
        ),
        # the row is the bad one's, also past the first rows (names and ids are checked in Arrow)
        (
            rows(("a", "pos"), ("b", "neg")),
            rows(("c", "neg"), ("d", "up")),
            None,
            r"'validation' row 1: label 'up'",
        ),
        (
            rows(("a", 1), ("b", 0)),
            rows(("c", 1), ("d", 4)),
            ["n", "p", "x"],
            r"'validation' row 1: label 4 is out",
        ),
    ],
)
def test_bad_labels_and_texts_name_the_split_row_and_fix(tmp_path, train, validation, labels, message):
    folder = folder_with(tmp_path, train, validation, labels=labels)
    with pytest.raises(DataError, match=message):
        load_splits(DataConfig(path=str(folder), test_split=None), seed=0)


def test_missing_column_names_the_columns_and_the_key(tmp_path):
    folder = folder_with(tmp_path, [{"sentence": "a", "label": "x"}, {"sentence": "b", "label": "y"}])
    with pytest.raises(
        DataError, match=r"no column 'text' \(columns: sentence, label\); set data\.text_column"
    ):
        load_splits(DataConfig(path=str(folder), test_split=None), seed=0)
    splits = load_splits(DataConfig(path=str(folder), test_split=None, text_column="sentence"), seed=0)
    assert list(splits.train["text"]) == ["a", "b"]


def test_drop_empty_counts_the_dropped_rows(tmp_path):
    folder = folder_with(tmp_path, rows(("a", "pos"), ("  ", "neg"), ("c", "neg")))
    splits = load_splits(DataConfig(path=str(folder), test_split=None, drop_empty=True), seed=0)
    assert len(splits.train) == 2 and splits.dropped_empty == {"train": 1, "validation": 1}


def test_empty_after_filtering_is_an_error(tmp_path):
    folder = folder_with(tmp_path, rows(("a", "x"), ("b", "y")), rows(("c", "x")), labels=["x", "y", "z"])
    with pytest.raises(DataError, match="split 'validation' is empty after filtering"):
        load_splits(DataConfig(path=str(folder), test_split=None, keep_labels=["y", "z"]), seed=0)


def test_unknown_dataset_name_explains_where_it_looked(monkeypatch):
    with pytest.raises(
        DataError, match=r"data\.path=no_such_set: not a local folder, not found under the data root"
    ):
        load_splits(DataConfig(path="no_such_set"), seed=0)


def test_csv_and_parquet_folders_load(tmp_path):
    import pandas as pd

    folder = tmp_path / "mixed"
    folder.mkdir()
    pd.DataFrame({"text": ["good", "bad"], "label": ["pos", "neg"]}).to_csv(folder / "train.csv", index=False)
    pd.DataFrame({"text": ["fine"], "label": ["pos"]}).to_parquet(folder / "validation.parquet")
    splits = load_splits(DataConfig(path=str(folder)), seed=0)
    assert splits.label_names == ["neg", "pos"] and splits.test is None and len(splits.eval) == 1


def test_length_grouped_sampler_is_seeded_complete_and_groups_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=1000).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(1000))
    assert first == list(LengthGroupedSampler(lengths, batch_size=16, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != first
    batches = [first[i : i + 16] for i in range(0, 1000, 16)]
    spread = np.mean([np.ptp([lengths[j] for j in b]) for b in batches])
    random_spread = np.mean([np.ptp(rng.choice(lengths, 16)) for _ in range(60)])
    assert spread < random_spread / 4  # batches of similar lengths: little padding


def test_class_balanced_sampling_draws_every_class_equally_often_and_still_groups_lengths():
    rng = np.random.default_rng(1)
    labels = np.array([0] * 900 + [1] * 80 + [2] * 20)  # 90% / 8% / 2%
    lengths = rng.integers(5, 120, size=1000).tolist()
    for sampler in (
        LengthGroupedSampler(lengths, batch_size=16, seed=3, labels=labels.tolist()),
        SeededRandomSampler(1000, seed=3, labels=labels.tolist()),
    ):
        order = list(sampler)
        assert len(order) == 1000
        shares = np.bincount(labels[order], minlength=3) / 1000
        assert np.all(np.abs(shares - 1 / 3) < 0.06), shares
        assert order == list(type(sampler)(**vars_of(sampler)))  # seeded: the same draw again
        sampler.set_epoch(1)
        assert list(sampler) != order
    grouped = list(LengthGroupedSampler(lengths, batch_size=16, seed=3, labels=labels.tolist()))
    batches = [grouped[i : i + 16] for i in range(0, 1000, 16)]
    spread = np.mean([np.ptp([lengths[j] for j in b]) for b in batches])
    assert spread < np.mean([np.ptp(rng.choice(lengths, 16)) for _ in range(60)]) / 4


def vars_of(sampler) -> dict:
    if isinstance(sampler, LengthGroupedSampler):
        return {
            "lengths": sampler.lengths.tolist(),
            "batch_size": sampler.batch_size,
            "seed": sampler.seed,
            "labels": sampler.labels.tolist(),
        }
    return {"size": sampler.size, "seed": sampler.seed, "labels": sampler.labels.tolist()}


def test_balanced_class_weights_follow_the_filtered_training_split(tmp_path):
    import datasets

    train = datasets.Dataset.from_dict({"label": [0] * 6 + [1] * 2})
    assert class_weights("none", ["a", "b"], train) is None
    # N / (K * count): 8 / (2 * 6) and 8 / (2 * 2); each class carries the same total weight
    assert class_weights("balanced", ["a", "b"], train) == pytest.approx([8 / 12, 2.0])
    assert class_weights({"b": 3.0}, ["a", "b"], train) == [1.0, 3.0]
    with pytest.raises(ConfigError, match="names \\['c'\\]"):
        class_weights({"c": 2.0}, ["a", "b"], train)
    # after data.keep_labels the weights are over the kept labels only
    folder = tmp_path / "skewed"
    folder.mkdir()
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate(["x"] * 6 + ["y"] * 3 + ["z"] * 1)]
    for split in ("train", "validation"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_splits(DataConfig(path=str(folder), keep_labels=["x", "y"]), seed=0)
    assert class_weights("balanced", splits.label_names, splits.train) == pytest.approx([9 / 12, 9 / 6])


def test_pad_collator_pads_to_the_longest_and_keeps_ids():
    batch = PadCollator(pad_token_id=0)(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1, "idx": 4},
            {"input_ids": [5], "attention_mask": [1], "labels": 0, "idx": 9},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["idx"].tolist() == [4, 9]
    assert PadCollator(0, pad_to_multiple_of=8)([{"input_ids": [1, 2, 3], "labels": 0, "idx": 0}])[
        "input_ids"
    ].shape == (1, 8)


# --- multi-label ----------------------------------------------------------------------------------


def test_real_goemotions_is_multi_label_with_28_labels():
    splits = load_splits(DataConfig(path="goemotions"), seed=0)
    assert splits.problem_type == "multi_label" and len(splits.label_names) == 28
    assert (len(splits.train), len(splits.eval), len(splits.test)) == (43410, 5426, 5427)
    hot = np.asarray(splits.train["label"])
    assert hot.shape == (43410, 28) and set(np.unique(hot)) == {0.0, 1.0} and hot.sum(axis=1).min() == 1
    # the README: 16.4% of training rows carry more than one label; neutral is on 14219 of them
    assert (hot.sum(axis=1) > 1).mean() == pytest.approx(0.164, abs=0.001)
    assert hot[:, splits.label_names.index("neutral")].sum() == 14219


def test_list_labels_become_multi_hot_rows_in_label_order(tmp_path):
    folder = folder_with(tmp_path, rows(("a", ["joy", "fear"]), ("b", ["fear"]), ("c", ["anger", "joy"])))
    splits = load_splits(DataConfig(path=str(folder), test_split=None), seed=0)
    assert splits.problem_type == "multi_label" and splits.label_names == ["anger", "fear", "joy"]
    assert list(splits.train["label"]) == [[0, 1, 1], [0, 1, 0], [1, 0, 1]]
    batch = PadCollator(0)(
        [{"input_ids": [1], "labels": r, "idx": i} for i, r in enumerate(splits.train["label"])]
    )
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [
        [0, 1, 1],
        [0, 1, 0],
        [1, 0, 1],
    ]
    # plain labels with problem_type=multi_label are one-label sets
    (tmp_path / "p").mkdir()
    plain = folder_with(tmp_path / "p", rows(("a", "joy"), ("b", "fear")))
    splits = load_splits(DataConfig(path=str(plain), test_split=None, problem_type="multi_label"), seed=0)
    assert splits.problem_type == "multi_label" and list(splits.train["label"]) == [[0, 1], [1, 0]]


def test_csv_labels_split_at_the_separator(tmp_path):
    folder = tmp_path / "csv"
    folder.mkdir()
    for split in ("train", "validation"):
        (folder / f"{split}.csv").write_text(
            'text,label\nfirst,joy|fear\nsecond,fear\nthird," anger | joy "\n'
        )
    splits = load_splits(DataConfig(path=str(folder), test_split=None, label_separator="|"), seed=0)
    assert splits.problem_type == "multi_label" and splits.label_names == ["anger", "fear", "joy"]
    assert list(splits.eval["label"]) == [[0, 1, 1], [0, 1, 0], [1, 0, 1]]


@pytest.mark.parametrize(
    ("train", "settings", "message"),
    [
        (
            rows(("a", ["joy"]), ("b", "fear"), ("c", ["fear"])),
            {},
            "split 'train' row 1: label 'fear' is a plain label",
        ),
        (
            rows(("a", ["joy"]), ("b", ["fear"])),
            {"problem_type": "single_label"},
            "set data.problem_type=multi_label",
        ),
        (rows(("a", ["joy"]), ("b", [])), {}, "split 'train' row 1: empty label list"),
        (
            rows(("a", ["joy"]), ("b", ["joy", "glee"])),
            {"labels": ["joy", "fear"]},
            "label 'glee' in the list",
        ),
        (rows(("a", ["joy"]), ("b", ["fear"])), {"class_balanced": True}, "no sound rule for multi-label"),
    ],
    ids=["mixed", "list-under-single-label", "empty-list", "unknown-name", "class-balanced"],
)
def test_bad_multi_label_data_names_the_row_and_fix(tmp_path, train, settings, message):
    folder = folder_with(tmp_path, train)
    with pytest.raises((DataError, ConfigError), match=message.replace("(", r"\(").replace("[", r"\[")):
        load_splits(DataConfig(path=str(folder), test_split=None, **settings), seed=0)


def test_empty_label_lists_when_allowed_and_keep_labels_on_sets(tmp_path):
    data = rows(("a", ["joy", "fear"]), ("b", []), ("c", ["anger"]), ("d", ["fear"]))
    folder = folder_with(tmp_path, data, labels=["anger", "fear", "joy"])
    splits = load_splits(DataConfig(path=str(folder), test_split=None, allow_empty_labels=True), seed=0)
    assert list(splits.train["label"]) == [[0, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0]]
    # keep_labels keeps those labels of every set, in the given order; rows left empty are dropped
    (tmp_path / "k").mkdir()
    folder = folder_with(tmp_path / "k", [r for r in data if r["label"]], labels=["anger", "fear", "joy"])
    kept = load_splits(DataConfig(path=str(folder), test_split=None, keep_labels=["joy", "anger"]), seed=0)
    assert kept.label_names == ["joy", "anger"] and list(kept.train["label"]) == [[1, 0], [0, 1]]
    assert list(kept.train["text"]) == ["a", "c"]


def test_balanced_class_weights_are_per_label_pos_weights_for_multi_label():
    import datasets

    train = datasets.Dataset.from_dict({"label": [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]})
    # negatives / positives: label 0 is on 3 of 4 rows (1/3), label 1 on 1 (3/1)
    assert class_weights("balanced", ["a", "b"], train) == pytest.approx([1 / 3, 3.0])
    assert class_weights({"b": 5.0}, ["a", "b"], train) == [1.0, 5.0]


@pytest.mark.parametrize("group_by_length", [True, False])
def test_train_and_eval_loaders_never_draw_from_the_global_rng(group_by_length):
    """Each loader has its own seeded generator: building and iterating one leaves the global RNG (and
    so the dropout masks after a resume) untouched, and the same seed gives the same batches."""
    import datasets

    from scalelora.data import eval_dataloader, train_dataloader

    rows = [
        {"input_ids": [1] * (2 + i % 7), "labels": i % 2, "idx": i, "length": 2 + i % 7} for i in range(40)
    ]
    ds = datasets.Dataset.from_list(rows)
    cfg = DataConfig(group_by_length=group_by_length)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    orders = [
        [b["idx"].tolist() for b in train_dataloader(ds, cfg, 8, seed=5, collate=PadCollator(0))]
        for _ in range(2)
    ]
    list(eval_dataloader(ds, 16, PadCollator(0)))
    assert torch.equal(torch.get_rng_state(), before)
    assert orders[0] == orders[1] and sorted(sum(orders[0], [])) == list(range(40))


# --- issue 27: answers that were silently wrong ---------------------------------------------------


def test_integer_labels_1_to_5_are_5_classes_and_perfect_predictions_score_1(tmp_path):
    """Labels 1..5 once made 6 classes with an empty class "0": perfect predictions scored macro-F1 0.833."""
    from scalelora.evaluation import decision_metrics

    data = [{"text": f"t{i}", "label": 1 + i % 5} for i in range(20)]
    folder = folder_with(tmp_path, data)
    splits = load_splits(DataConfig(path=str(folder), test_split=None), seed=0)
    assert splits.label_names == ["1", "2", "3", "4", "5"]
    gold = np.asarray(splits.eval["label"])
    assert gold.tolist() == [i % 5 for i in range(20)]  # label 1 is id 0, ..., label 5 is id 4
    metrics = decision_metrics(gold.copy(), gold, splits.label_names, "single_label")
    assert metrics["macro_f1"] == 1.0


def test_a_class_only_the_validation_split_has_is_still_a_class(tmp_path):
    # ids 0..K-1 with class 1 missing from train (worked before, keeps working), and values with gaps
    for train_labels, eval_labels, names in (
        ([0, 2, 2, 0], [1, 2, 0], ["0", "1", "2"]),
        ([3, 7], [5, 7], ["3", "5", "7"]),
    ):
        (tmp_path / names[-1]).mkdir()
        folder = folder_with(
            tmp_path / names[-1],
            [{"text": f"t{i}", "label": v} for i, v in enumerate(train_labels)],
            [{"text": f"v{i}", "label": v} for i, v in enumerate(eval_labels)],
        )
        splits = load_splits(DataConfig(path=str(folder), test_split=None), seed=0)
        assert splits.label_names == names
        assert [names[i] for i in splits.eval["label"]] == [str(v) for v in eval_labels]


def test_labels_json_still_decides_what_integer_labels_mean(tmp_path):
    """With labels.json (or data.labels) an integer label is an id into it, as before."""
    data = [{"text": f"t{i}", "label": 1 + i % 3} for i in range(9)]
    folder = folder_with(tmp_path, data, labels=["zero", "one", "two", "three"])
    splits = load_splits(DataConfig(path=str(folder), test_split=None), seed=0)
    assert splits.label_names == ["zero", "one", "two", "three"]
    assert list(splits.train["label"])[:3] == [1, 2, 3]
    given = load_splits(DataConfig(path=str(folder), test_split=None, labels=["a", "b", "c", "d"]), seed=0)
    assert given.label_names == ["a", "b", "c", "d"] and list(given.train["label"])[:3] == [1, 2, 3]


@pytest.mark.parametrize("multi", [False, True])
def test_a_training_split_with_one_class_is_refused_naming_the_file_and_the_class(tmp_path, multi):
    label = ["joy"] if multi else "joy"
    folder = folder_with(
        tmp_path,
        rows(("a", label), ("b", label)),
        rows(("c", label), ("d", ["sad"] if multi else "sad")),
        labels=["joy", "sad"],
    )
    with pytest.raises(
        DataError, match=rf"{folder / 'train.jsonl'}: every training row has the label (set )?\W*joy"
    ):
        load_splits(DataConfig(path=str(folder), test_split=None), seed=0)
    # after filtering too: the subset the run would train on
    (tmp_path / "kept").mkdir()
    other = folder_with(tmp_path / "kept", rows(("a", "joy"), ("b", "sad"), ("c", "sad")))
    with pytest.raises(DataError, match="every training row has the label 'sad'"):
        load_splits(
            DataConfig(
                path=str(other), test_split=None, keep_labels=["sad", "meh"], labels=["joy", "sad", "meh"]
            ),
            seed=0,
        )


def test_balanced_weights_are_bounded_for_a_one_example_class():
    """1M rows over 500 classes with a one-example class: its inverse-frequency weight would be ~2,000x
    the largest class's; multi-label pos_weight of a label on 1 of 1M rows would be ~1e6."""
    import pyarrow as pa

    from scalelora.data import CLASS_WEIGHT_MAX_RATIO, bounded_class_weights

    counts = np.full(500, 2_000)
    counts[0], counts[1] = 1_000_000 - counts[2:].sum() - 1, 1
    labels = np.repeat(np.arange(500), counts)
    names = [f"c{k}" for k in range(500)]
    weights = bounded_class_weights("balanced", names, pa.table({"label": labels}))
    largest = len(labels) / (500 * counts[0])
    assert weights.values[1] == pytest.approx(CLASS_WEIGHT_MAX_RATIO * largest) and weights.capped == ["c1"]
    assert weights.values[2] == pytest.approx(len(labels) / (500 * 2_000))  # under the bound: unchanged
    hot = np.zeros((1_000, 2))
    hot[:, 0], hot[0, 1] = 1.0, 1.0  # label b on one row of 1,000
    multi = bounded_class_weights("balanced", ["a", "b"], pa.table({"label": hot.tolist()}))
    assert multi.values == pytest.approx([0.0, CLASS_WEIGHT_MAX_RATIO]) and multi.capped == ["b"]


def test_the_committed_results_rows_keep_their_balanced_class_weights():
    """Every results row that trained with `balanced` weights gets the same weights under the bound."""
    from scalelora.data import label_counts

    rows = json.loads((Path(__file__).parents[1] / "results" / "results.json").read_text())["results"]
    checked = set()
    for row in rows:
        config = row.get("config") or {}
        if config.get("train", {}).get("class_weights") != "balanced":
            continue
        data = DataConfig(**{k: v for k, v in config["data"].items() if k in DataConfig.__dataclass_fields__})
        key = (data.path, tuple(data.keep_labels or ()), data.max_train_samples)
        if key in checked:
            continue
        checked.add(key)
        splits = load_splits(data, seed=config["seed"])
        counts = label_counts(splits.train, len(splits.label_names))
        unbounded = [len(splits.train) / (len(counts) * c) for c in counts]
        assert class_weights("balanced", splits.label_names, splits.train) == pytest.approx(unbounded), key
    assert {k[0] for k in checked} == {"emotion", "tamilmix_fire2020"}  # the rows with balanced weights


@pytest.mark.parametrize("multi", [False, True])
def test_the_weight_bound_is_logged_when_it_applies(multi):
    from types import SimpleNamespace

    import pyarrow as pa

    from scalelora.data import class_weight_tensor

    counts = [100, 50, 1]
    ids = np.repeat(np.arange(3), counts)
    label = np.eye(3)[ids].tolist() if multi else ids
    splits = SimpleNamespace(
        train=pa.table({"label": label}), problem_type="multi_label" if multi else "single_label"
    )
    cfg = SimpleNamespace(
        train=SimpleNamespace(class_weights="balanced"), data=SimpleNamespace(class_balanced=False)
    )
    log: list[str] = []
    weights = class_weight_tensor(cfg, ["a", "b", "rare"], splits, "cpu", log.append)
    assert float(weights.max()) == pytest.approx(20.0 if multi else 20 * 151 / 300)
    bound = "a positive at most 20x a negative" if multi else "no class more than 20x the largest class"
    assert any(f"bounded ({bound}): 1 rare label(s), e.g. rare" in line for line in log), log
    # under the bound: no such line
    log.clear()
    even = SimpleNamespace(train=pa.table({"label": np.arange(30) % 3}), problem_type="single_label")
    class_weight_tensor(cfg, ["a", "b", "rare"], even, "cpu", log.append)
    assert len(log) == 1 and "bounded" not in log[0]
