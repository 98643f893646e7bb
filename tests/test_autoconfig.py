"""The default for a user's own data (recipe `auto`, or no --config): what it chooses, that it says so, and
that a key the user sets wins."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import yaml

from conftest import FILLER, NEGATIVE, POSITIVE, run_cli, write_jsonl, write_toy_dataset
from scalelora.autoconfig import choose, length_cap


def intent_folder(folder, classes: int = 77, seed: int = 0):
    """A skewed many-class set: class c has 2 + (c % 7) training rows (2..8), so the largest is 4x the smallest."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for split, scale in (("train", 1), ("validation", 1)):
        rows = []
        for c in range(classes):
            for _ in range(scale * (2 + c % 7) if split == "train" else 1):
                words = [f"w{c}"] + [
                    rng.choice(["please", "my", "card", "the", "now", "help"])
                    for _ in range(rng.randint(2, 9))
                ]
                rows.append({"text": " ".join(words), "label": f"intent_{c:02d}"})
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


def auto_run(model, data, out, *extra):
    args = [f"model.name={model}", f"data.path={data}", f"output_dir={out}", "train.max_steps=1", *extra]
    return run_cli("scalelora.train", args)


def chosen(out) -> dict:
    return yaml.safe_load((out / "config.yaml").read_text())


def test_two_class_folder_gets_a_small_adapter_more_epochs_and_no_weights(tiny_bert, tmp_path):
    data = write_toy_dataset(tmp_path / "two", sizes={"train": 96, "validation": 20})
    out = tmp_path / "out"
    done = auto_run(tiny_bert, data, out)
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = chosen(out)
    assert cfg["recipe"] == "auto"
    assert (
        cfg["lora"]["r"] == 8
        and cfg["lora"]["alpha"] == 16
        and cfg["lora"]["target_modules"] == ["all-linear"]
    )
    assert cfg["train"]["epochs"] == 10 and cfg["train"]["head_lr"] == 3e-3
    assert cfg["train"]["class_weights"] == "none"
    assert 32 <= cfg["data"]["max_length"] <= 40  # toy texts: at most ~16 words + 2 special tokens
    log = done.stderr
    assert "scalelora: auto: lora.r=8 (2 classes and 96 examples are served by a small adapter)" in log
    assert "scalelora: auto: train.class_weights=none (the classes are balanced enough (1.0x at most))" in log
    assert (
        "scalelora: auto: data.clean_html=False (0.0% of 96 training texts carry HTML markup (at most 1%): "
        "texts read as written)" in log
    )
    assert cfg["data"]["clean_html"] is False
    assert "scalelora: auto: train.epochs=10" in log and "scalelora: auto: data.max_length=" in log


def test_many_skewed_classes_get_a_bigger_adapter_a_faster_head_and_balanced_weights(tiny_bert, tmp_path):
    data = intent_folder(tmp_path / "intents")
    out = tmp_path / "out"
    done = auto_run(tiny_bert, data, out)
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = chosen(out)
    assert cfg["lora"]["r"] == 16 and cfg["lora"]["alpha"] == 32
    assert cfg["train"]["head_lr"] == 5e-3 and cfg["train"]["class_weights"] == "balanced"
    assert "77 classes" in done.stderr and "4.0x the smallest" in done.stderr
    assert "scalelora: class weights (balanced):" in done.stderr


def test_a_key_the_user_sets_is_kept_and_alpha_follows_it(tiny_bert, tmp_path):
    data = write_toy_dataset(tmp_path / "two", sizes={"train": 96, "validation": 20})
    out = tmp_path / "out"
    done = run_cli(
        "scalelora.train",
        [
            "--config",
            "auto",
            f"model.name={tiny_bert}",
            f"data.path={data}",
            f"output_dir={out}",
            "train.max_steps=1",
            "lora.r=4",
            "train.epochs=2",
        ],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = chosen(out)
    assert cfg["lora"]["r"] == 4 and cfg["lora"]["alpha"] == 8 and cfg["train"]["epochs"] == 2
    assert "scalelora: auto: lora.r kept as you set it" in done.stderr


def test_without_config_and_without_data_path_the_usage_line_and_exit_2():
    done = run_cli("scalelora.train", ["train.lr=1e-3"])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "scalelora: error: --config RECIPE_OR_YAML is required (see --list), or data.path=FOLDER for the "
        "default that chooses its settings from your data"
    ]


@pytest.mark.parametrize(
    ("quantile_of", "limit", "expected"), [(57, None, 64), (10, None, 32), (300, None, 256), (300, 128, 128)]
)
def test_max_length_is_the_99th_percentile_rounded_up_to_8_within_bounds(quantile_of, limit, expected):
    lengths = np.full(200, quantile_of)
    assert length_cap(lengths, limit)[0] == expected


def test_multi_label_data_gets_no_class_weights():
    counts = np.array([4000, 20])  # a rare label: pos_weight would be ~2000
    chosen = {c.key: c for c in choose(4020, counts, np.full(10, 20), None, multi_label=True)}
    assert (
        chosen["train.class_weights"].value == "none"
        and "multi-label" in chosen["train.class_weights"].reason
    )


def test_epochs_follow_the_training_size():
    counts = np.array([50, 50])
    lengths = np.full(10, 20)
    epochs = {
        n: next(c.value for c in choose(n, counts, lengths, None) if c.key == "train.epochs")
        for n in (500, 16_000, 67_000)
    }
    assert epochs == {500: 10, 16_000: 4, 67_000: 1}


def test_the_length_reason_states_the_real_percentile_and_the_cap():
    """Texts of ~700 tokens: the lengths are measured untruncated (the probe once stopped at the model's
    512), the choice is capped at 256, and the log says so with the share of texts cut."""
    import datasets

    from scalelora.autoconfig import length_sample
    from scalelora.config import ModelConfig
    from scalelora.models import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name="minilm-l6"))
    train = datasets.Dataset.from_dict({"text": [" ".join(["word"] * (600 + i)) for i in range(40)]})
    lengths = length_sample(train, tokenizer)
    assert lengths.min() == 602 and lengths.max() == 641  # [CLS] + words + [SEP], never cut at 512
    chosen = {c.key: c for c in choose(40, np.array([20, 20]), lengths, tokenizer.model_max_length)}
    assert chosen["data.max_length"].value == 256
    reason = chosen["data.max_length"].reason
    assert "99% of the 40 training texts have at most 641 tokens" in reason
    assert (
        "capped at the auto default's bound 256" in reason
        and "100.0% of them are longer and will be truncated" in reason
    )
    # within the bound nothing is capped, and the sentence is the one it always was
    short = {c.key: c for c in choose(40, np.array([20, 20]), np.full(40, 50), 512)}["data.max_length"]
    assert short.value == 56 and short.reason == "99% of the 40 training texts have at most 50 tokens"


def test_a_long_epoch_gets_evaluations_and_checkpoints_every_50k_examples():
    counts, lengths = np.array([50, 50]), np.full(10, 20)
    chosen = {c.key: c for c in choose(1_000_000, counts, lengths, None, examples_per_step=32)}
    assert chosen["train.epochs"].value == 1
    assert chosen["eval.every"].value == chosen["checkpoint.every"].value == 1_562  # 50,000 / 32 examples
    assert "loses at most that much" in chosen["checkpoint.every"].reason
    # counted in examples, not steps: 4 processes take 4x the examples per step
    assert {c.key: c for c in choose(1_000_000, counts, lengths, None, examples_per_step=128)}[
        "eval.every"
    ].value == 391
    # an epoch of at most ~50k examples keeps evaluating once per epoch (the shipped sets but sst2)
    for n in (8_530, 16_000, 43_410):
        assert "eval.every" not in {c.key for c in choose(n, counts, lengths, None, examples_per_step=32)}


def test_the_chosen_checkpoint_interval_reaches_the_checkpointer(tiny_bert, tmp_path, monkeypatch):
    """The checkpointer is built before the data is read: a run stopped by anything after step 2 of 3
    (interval 2 here) resumes from step 2, not from the start."""
    from scalelora import autoconfig, train

    monkeypatch.setattr(autoconfig, "EXAMPLES_PER_EVAL", 64)  # 2 steps of 32 (96 rows: 3 steps per epoch)
    data = write_toy_dataset(tmp_path / "two", sizes={"train": 96, "validation": 20})
    out = tmp_path / "out"
    args = [f"model.name={tiny_bert}", f"data.path={data}", f"output_dir={out}", "train.max_steps=3"]
    assert train.main([*args, "checkpoint.keep_last=5"]) == 0
    cfg = chosen(out)
    assert cfg["eval"]["every"] == 2 and cfg["checkpoint"]["every"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")) == [
        "step-2",
        "step-3",
    ]
    validations = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"validation"' in line
    ]
    assert validations == [2, 3]


def test_token_lengths_of_a_large_set_come_from_a_seeded_sample(monkeypatch):
    import datasets

    from scalelora import autoconfig
    from scalelora.config import ModelConfig
    from scalelora.models import load_tokenizer

    monkeypatch.setattr(autoconfig, "LENGTH_SAMPLE_ROWS", 30)
    tokenizer = load_tokenizer(ModelConfig(name="minilm-l6"))
    train = datasets.Dataset.from_dict({"text": [" ".join(["word"] * (1 + i % 7)) for i in range(100)]})
    sample = autoconfig.length_sample(train, tokenizer)
    assert len(sample) == 30 and (sample == autoconfig.length_sample(train, tokenizer)).all()
    assert set(sample.tolist()) <= {3, 4, 5, 6, 7, 8, 9}  # [CLS] + 1..7 words + [SEP]
    reason = {c.key: c for c in choose(100, np.array([50, 50]), sample, 512)}["data.max_length"].reason
    assert reason.startswith("99% of a seeded sample of 30 of the 100 training texts have at most")


def test_autoconfig_chooses_the_mode_from_how_many_texts_would_be_cut():
    from scalelora.autoconfig import long_text_choice

    # an IMDB-like spread of whole lengths: 45% over 256 tokens, 15% over 512
    rng = np.random.default_rng(0)
    imdb = np.concatenate(
        [rng.integers(60, 256, 550), rng.integers(257, 512, 300), rng.integers(513, 1500, 150)]
    )
    assert long_text_choice(imdb, 256, 512).value == "head_tail"
    assert long_text_choice(np.full(100, 40), 256, 512).value == "truncate"
    assert long_text_choice(np.full(100, 2000), 256, 512).value == "chunk"

    # the documented thresholds, at their edges: at most 10% over the cap truncates, at most 25% over the
    # model's limit reads head and tail, more chunks
    def spread(over_cap: int, over_limit: int) -> np.ndarray:  # of 100 texts
        return np.array([40] * (100 - over_cap) + [300] * (over_cap - over_limit) + [600] * over_limit)

    assert long_text_choice(spread(10, 0), 256, 512).value == "truncate"
    assert long_text_choice(spread(11, 0), 256, 512).value == "head_tail"
    assert long_text_choice(spread(30, 25), 256, 512).value == "head_tail"
    assert long_text_choice(spread(30, 26), 256, 512).value == "chunk"
    chosen = {
        c.key: c
        for c in choose(len(imdb), np.array([500, 500]), np.minimum(imdb, 512), 512, full_lengths=imdb)
    }
    assert chosen["data.long_text"].value == "head_tail" and chosen["data.max_length"].value == 512
    assert "45.0% of the 1,000 training texts are longer than 256 tokens" in chosen["data.long_text"].reason
    # a mode the user set lifts the cap too
    kept = {
        c.key: c
        for c in choose(
            1000, np.array([500, 500]), np.minimum(imdb, 512), 512, full_lengths=imdb, user_long_text="chunk"
        )
    }
    assert kept["data.max_length"].value == 512


def test_auto_on_a_folder_of_long_texts_reads_them_whole_and_says_why(tiny_bert, tmp_path, capsys):
    import shutil

    from scalelora.train import main

    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(0)
    for split, n in (("train", 40), ("validation", 8)):
        rows = []
        for i in range(n):  # 5 of 40 training texts (12.5%) are longer than the model's 64 tokens
            words = [rng.choice(FILLER) for _ in range(80 if i % 7 == 6 else rng.randint(4, 10))]
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if i % 2 else NEGATIVE))
            rows.append({"text": " ".join(words), "label": ["neg", "pos"][i % 2]})
        write_jsonl(data / f"{split}.jsonl", rows)
    out = tmp_path / "out"
    args = [
        f"model.name={model}",
        f"data.path={data}",
        f"output_dir={out}",
        "train.max_steps=1",
        "train.precision=no",
    ]
    assert main(args) == 0
    err = capsys.readouterr().err
    chosen = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert chosen["long_text"] == "head_tail" and chosen["max_length"] == 64
    assert (
        "scalelora: auto: data.long_text=head_tail (12.5% of the 40 training texts are longer than 64 tokens"
        in err
    )
    assert "scalelora: long_text=head_tail: train:" in err


def test_markup_in_over_1_percent_of_the_training_texts_is_cleaned_and_the_log_says_why():
    import datasets

    from scalelora import autoconfig

    plain = ["a fine film"] * 98
    two = datasets.Dataset.from_dict({"text": [*plain, "a fine<br />film", "fine &amp; good"]})
    one = datasets.Dataset.from_dict({"text": [*plain, "a fine <i>film</i>", "a <grin> and a < b"]})
    assert autoconfig.markup_share(two) == 0.02 and autoconfig.markup_share(one) == 0.01  # `<grin>` is text
    counts, lengths = np.array([50, 50]), np.full(100, 5)
    chosen = {c.key: c for c in choose(100, counts, lengths, 512, markup=(0.02, 100))}["data.clean_html"]
    assert chosen.value is True
    assert chosen.reason.startswith(
        "2.0% of 100 training texts carry HTML markup (`<br />`, `<i>`, `&amp;`, ...; over 1%)"
    )
    assert {c.key: c for c in choose(100, counts, lengths, 512, markup=(0.01, 100))}[
        "data.clean_html"
    ].value is False
    assert "data.clean_html" not in {c.key for c in choose(100, counts, lengths, 512)}
    # the rule's version reaches data with markup only: a default row on other data stays current
    assert autoconfig.rule_changes_reaching(2, two) == [3] and autoconfig.rule_changes_reaching(2, one) == []
    assert autoconfig.rule_changes_reaching(1, one) == [2]
    assert autoconfig.rule_changes_reaching(2, None) == [3]  # the data not at hand: it may reach it
