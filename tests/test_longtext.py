"""Long documents (`data.long_text`, longtext.py): head_tail and chunk inputs, whole documents in a batch,
pooled window logits, `data.clean_html`; the modes trained with LoRA and in full, on 1 and 2 processes and
under ZeRO-2, and scored the same by evaluation, `predict`, `export` and the teacher-logits cache. The
autoconfig rule that chooses a mode is in test_autoconfig.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    FILLER,
    NEGATIVE,
    POSITIVE,
    ROOT,
    accelerate_launch,
    free_port,
    read_summary,
    run_cli,
    save_tiny_classifier,
    save_tiny_model,
    tiny_overrides,
    write_jsonl,
)
from scalelora import longtext
from scalelora.config import load_config
from scalelora.errors import ConfigError, DataError
from scalelora.longtext import LongText, clean_html, encode_batch, pool_logits, window_starts
from scalelora.trainer import Trainer


def write_long_dataset(folder: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A 2-class set of texts of 4-40 filler words around one polar word anywhere, with `<br />` markup:
    many are longer than the 16-token inputs of these tests."""
    sizes = sizes or {"train": 48, "validation": 16, "test": 16}
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        rows = []
        for i in range(n):
            label = "pos" if i % 2 == 0 else "neg"
            words = [rng.choice(FILLER) for _ in range(rng.randint(4, 40))]
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
            if len(words) > 8:
                words.insert(len(words) // 2, "<br /><br />")
            rows.append({"text": " ".join(words), "label": label})
        write_jsonl(folder / f"{split}.jsonl", rows)
    (folder / "labels.json").write_text(json.dumps(["neg", "pos"]))
    return folder


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> Path:
    return write_long_dataset(tmp_path_factory.mktemp("long") / "long")


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


# windows of 16 tokens (14 of text), sharing 4; at most 3 per text: the longest texts lose windows
CHUNK = {
    "data.long_text": "chunk",
    "data.max_length": 16,
    "data.chunk_stride": 4,
    "data.max_chunks": 3,
    "data.clean_html": "true",
}
HEAD_TAIL = {"data.long_text": "head_tail", "data.max_length": 16, "data.clean_html": "true"}
# deterministic runs whose 16 training documents per step are the same however they are split
EXACT = {
    "lora.dropout": 0.0,
    "data.group_by_length": "false",
    "train.max_steps": 4,
    "train.log_every": 1,
    "eval.every": 4,
    "eval.calibrate": "false",
    "eval.save_predictions": "true",
    "train.max_grad_norm": 0.5,
}


# --- inputs ---------------------------------------------------------------------------------------


def tokens(tokenizer, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids)


def test_head_tail_keeps_the_first_and_last_tokens_and_short_texts_as_truncation_does(tokenizer):
    text = " ".join("abcdefghijklmnopqrstuvwxyz")
    cut = encode_batch(tokenizer, [text, "short one"], None, LongText("head_tail", 12))
    # 10 tokens of text beside [CLS] and [SEP]: a quarter of them (rounded up) from the head, the rest from the end
    assert tokens(tokenizer, cut["input_ids"][0]) == ["[CLS]", *"abc", *"tuvwxyz", "[SEP]"]
    assert cut["length"] == [12, 4] and cut[longtext.FULL_LENGTH] == [28, 4]
    # at max_length 512: 128 head and 382 tail (the docs' split)
    assert longtext.head_count(512 - 2, None) == 128
    plain = tokenizer([text, "short one"], truncation=True, max_length=12)
    assert (
        cut["input_ids"][1] == plain["input_ids"][1]
        and cut["token_type_ids"][1] == plain["token_type_ids"][1]
    )
    head = encode_batch(tokenizer, [text], None, LongText("head_tail", 12, head_tokens=6))
    assert tokens(tokenizer, head["input_ids"][0]) == ["[CLS]", *"abcdef", *"wxyz", "[SEP]"]
    truncated = encode_batch(tokenizer, [text], None, LongText("truncate", 12))
    assert truncated["input_ids"] == tokenizer([text], truncation=True, max_length=12)["input_ids"]


def test_truncation_side_cuts_under_truncate_only(tiny_bert):
    from transformers import AutoTokenizer

    text = " ".join("abcdefghijklmnopqrstuvwxyz")
    right, left = (
        AutoTokenizer.from_pretrained(tiny_bert, truncation_side=side) for side in ("right", "left")
    )
    for mode in ("head_tail", "chunk"):
        settings = LongText(mode, 12, chunk_stride=2)
        assert encode_batch(left, [text], None, settings) == encode_batch(right, [text], None, settings)
    cut = encode_batch(left, [text], None, LongText("truncate", 12))
    assert tokens(left, cut["input_ids"][0]) == ["[CLS]", *"qrstuvwxyz", "[SEP]"]


def test_chunk_windows_overlap_end_at_the_end_and_the_cap_keeps_the_first_and_last(tokenizer):
    assert window_starts(10, 10, 2, 8) == ([0], 1)
    assert window_starts(26, 10, 2, 8) == ([0, 8, 16], 3)
    assert window_starts(27, 10, 2, 8) == ([0, 8, 16, 17], 4)  # the last window ends at the text's end
    assert window_starts(60, 10, 2, 3) == ([0, 8, 50], 8)  # beyond max_chunks: the first ones and the last
    # the stride defaults to a quarter of max_length (64 for windows of 256), as docs/classification.md says
    default = load_config("quickstart", ["data.long_text=chunk", "data.max_length=256"]).data
    assert default.chunk_stride is None and LongText.from_config(default).chunk_stride == 64
    text = " ".join("abcdefghijklmnopqrstuvwxyz")
    out = encode_batch(
        tokenizer, [text, "short one"], None, LongText("chunk", 12, chunk_stride=2, max_chunks=8)
    )
    windows = [tokens(tokenizer, w) for w in out["input_ids"][0]]
    assert windows == [
        ["[CLS]", *"abcdefghij", "[SEP]"],
        ["[CLS]", *"ijklmnopqr", "[SEP]"],
        ["[CLS]", *"qrstuvwxyz", "[SEP]"],
    ]
    assert out[longtext.WINDOWS] == [3, 1] and out["length"] == [36, 4] and "attention_mask" not in out
    assert out["input_ids"][1] == [tokenizer("short one")["input_ids"]]
    capped = encode_batch(tokenizer, [text], None, LongText("chunk", 8, chunk_stride=2, max_chunks=2))
    assert [tokens(tokenizer, w) for w in capped["input_ids"][0]] == [
        ["[CLS]", *"abcdef", "[SEP]"],
        ["[CLS]", *"uvwxyz", "[SEP]"],
    ]


def test_the_chunk_log_line_counts_one_text_and_one_window_in_the_singular(tokenizer):
    settings = LongText("chunk", 8, chunk_stride=2, max_chunks=2)
    text = " ".join("abcdefghijklmn")  # 14 tokens: windows of 6 at 0, 4 and 8, one over the cap of 2
    encoded = encode_batch(tokenizer, [text, "a b"], None, settings)
    described = longtext.describe({"train": encoded}, settings, tokenizer)
    assert described["splits"]["train"]["over_max_chunks"] == 1
    assert described["splits"]["train"]["windows_dropped"] == 1
    (line,) = longtext.log_lines(described, settings, tokenizer)
    assert line.endswith(
        "; 1 text (50.00%) needed more than data.max_chunks=2 windows: each kept its first 1 and its last "
        "(1 window dropped)"
    )
    assert longtext.counted(14, "text") == "14 texts" and longtext.counted(1_000, "window") == "1,000 windows"


def test_a_batch_holds_whole_documents_and_their_windows_pool_into_one_row(tokenizer):
    from scalelora.data import PadCollator

    encoded = encode_batch(
        tokenizer,
        ["a b c d e f g h i j k l", "m n"],
        None,
        LongText("chunk", 8, chunk_stride=2, max_chunks=8),
    )
    rows = [
        {
            "input_ids": encoded["input_ids"][i],
            "token_type_ids": encoded["token_type_ids"][i],
            "labels": i,
            "idx": 7 + i,
        }
        for i in range(2)
    ]
    batch = PadCollator(tokenizer.pad_token_id)(rows)
    assert batch["doc"].tolist() == [0, 0, 0, 1] and batch["input_ids"].shape == (4, 8)
    assert batch["labels"].tolist() == [0, 1] and batch["idx"].tolist() == [7, 8]
    assert batch["attention_mask"].sum(dim=1).tolist() == [8, 8, 8, 4]
    logits = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 1.0], [5.0, -5.0]], requires_grad=True)
    mean = pool_logits(logits, batch["doc"], 2, "mean")
    torch.testing.assert_close(mean, torch.tensor([[2.0, 1.0], [5.0, -5.0]]))
    torch.testing.assert_close(
        pool_logits(logits, batch["doc"], 2, "max"), torch.tensor([[3.0, 2.0], [5.0, -5.0]])
    )
    soft = pool_logits(logits, batch["doc"], 2, "logmeanexp")
    expected = torch.logsumexp(logits[:3].detach(), dim=0) - torch.log(torch.tensor(3.0))
    torch.testing.assert_close(soft[0], expected)
    assert torch.equal(soft[1], logits[3].detach())  # a one-window document: its window's logits exactly
    soft.sum().backward()  # the gradient reaches every window through the pooling
    assert (logits.grad[:3].sum(dim=0) - torch.ones(2)).abs().max() < 1e-6 and torch.equal(
        logits.grad[3], torch.ones(2)
    )


def test_clean_html_removes_markup_and_keeps_text_in_angle_brackets():
    assert (
        clean_html("Great.<br /><br />Not <i>bad</i>, <EM>really</EM>.<BR>End")
        == "Great. Not bad, really. End"
    )
    assert clean_html("<p>one</p>\n<p>two</p> &amp; &#345; &quot;x&quot; &notit") == 'one two & ř "x" &notit'
    kept = "I loved it <grin> (as in <sp?) Romeo & Juliet <SPOILER>the end</SPOILER>"
    assert clean_html(kept) == kept
    assert clean_html("  a <br/>") == "a"


def test_chunked_batches_hold_whole_documents_grouped_by_length_within_the_cap(long_data, tokenizer):
    from dataclasses import replace

    from scalelora.data import PadCollator, load_splits, tokenize_split, train_dataloader

    cfg = load_config("quickstart", [f"data.path={long_data}", *(f"{k}={v}" for k, v in CHUNK.items())]).data
    train = tokenize_split(load_splits(cfg, 0).train, tokenizer, cfg)
    windows = np.asarray(train[longtext.WINDOWS])
    assert windows.max() == cfg.max_chunks and windows.min() == 1

    def batches(grouped: bool) -> list[dict]:
        loader = train_dataloader(train, replace(cfg, group_by_length=grouped), 4, 0, PadCollator(0))
        return list(loader)

    spread = {}
    for grouped in (True, False):
        seen = batches(grouped)
        assert sum(len(b["labels"]) for b in seen) == 48  # every document once, whole
        for b in seen:
            per_doc = torch.bincount(b["doc"], minlength=len(b["labels"]))
            assert per_doc.min() >= 1 and b["input_ids"].shape[0] <= 4 * cfg.max_chunks
        spread[grouped] = np.mean([float(np.ptp(torch.bincount(b["doc"]).numpy())) for b in seen])
    # documents of like length (windows) share a batch, as single inputs do
    assert spread[True] < spread[False] / 4


def test_every_token_key_changes_the_tokenization_fingerprint(tiny_bert, long_data, tokenizer):
    from dataclasses import replace

    from scalelora.data import load_splits, tokenize_split

    cfg = load_config("quickstart", [f"data.path={long_data}", "data.max_length=16"]).data
    train = load_splits(cfg, 0).train
    changed = {
        "data.long_text": "head_tail",
        "data.head_tokens": 3,
        "data.chunk_stride": 2,
        "data.max_chunks": 4,
        "data.clean_html": True,
    }
    assert set(changed) == set(longtext.TOKEN_KEYS)
    base = replace(cfg, long_text="chunk", chunk_stride=4)  # where chunk_stride and max_chunks count
    prints = {tokenize_split(train, tokenizer, base)._fingerprint}
    for key, value in changed.items():
        name = key.split(".", 1)[1]
        variant = replace(
            base, **{name: value}, **({"long_text": "head_tail"} if name == "head_tokens" else {})
        )
        prints.add(tokenize_split(train, tokenizer, variant)._fingerprint)
    assert len(prints) == 1 + len(changed)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.long_text=chunk", "data.text_pair_column=b"], "reads single texts"),
        (["data.max_chunks=1"], "at least 2"),
        (["data.long_text=chunk", "data.max_length=64", "data.chunk_stride=40"], "at most half"),
    ],
)
def test_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("quickstart", overrides)


@pytest.mark.parametrize(
    ("mode", "said", "not_said"),
    [
        (
            "truncate",
            ["longer than data.max_length=64 tokens and are cut to it", "truncation_side"],
            ["middle"],
        ),
        (
            "head_tail",
            ["longer than data.max_length=64 tokens and lose their middle", "head_tail"],
            ["cut to it"],
        ),
        (
            "chunk",
            ["more than data.max_chunks=3 windows of data.max_length=64", "data.long_text=chunk"],
            ["cut to it"],
        ),
    ],
)
def test_the_warning_and_report_say_what_each_mode_did_to_the_texts_not_read_whole(mode, said, not_said):
    from scalelora import data as data_lib
    from scalelora import report
    from scalelora.config import to_dict

    cfg = load_config("quickstart", [f"data.long_text={mode}", "data.max_length=64", "data.max_chunks=3"])
    truncated = {"train": {"rows": 30, "share": 0.3}}
    (warning,) = data_lib.truncation_lines(truncated, cfg.data)
    assert warning.startswith("scalelora: warning: 30.0% of the train texts (30) ")
    assert all(s in warning for s in said) and not any(s in warning for s in not_said)
    (line,) = [x for x in report.truncation_lines({"truncated": truncated}, to_dict(cfg)) if x]
    assert line.endswith(": train 30 (30.0%).")
    assert ("truncated" in line) == (mode == "truncate")
    assert f"data.long_text={mode}" in line or mode == "truncate"


# the imdb section's rows (studies/results.py: DATASET_RUNS["imdb"], LONG_TEXT_RUNS)
IMDB_ROWS = ("tfidf_lr", "truncate_256", "head_tail_512", "chunk", "auto_default")


def test_the_imdb_recipe_names_the_study_rows_each_in_its_mode(tmp_path):
    from scalelora.study.pipeline import Pipeline

    pipeline = Pipeline("results_imdb", tmp_path, [], IMDB_ROWS)
    modes = {}
    for run in IMDB_ROWS[1:-1]:
        cfg = load_config(*pipeline.run_config(run))
        assert cfg.data.clean_html and (cfg.data.eval_split, cfg.data.test_split) == ("validation", "test")
        # 32 documents an optimizer step in every row
        assert cfg.train.batch_size * cfg.train.grad_accum == 32
        modes[run] = (cfg.data.long_text, cfg.data.max_length)
    assert modes == {
        "truncate_256": ("truncate", 256),
        "head_tail_512": ("head_tail", 512),
        "chunk": ("chunk", 256),
    }
    recipe, overrides = pipeline.run_config("auto_default")
    assert recipe == "auto" and load_config(recipe, overrides).data.path == "imdb"
    imdb = load_config("imdb").data
    assert (imdb.eval_split, imdb.test_split, imdb.clean_html) == ("validation", "test", True)


# --- trained runs ---------------------------------------------------------------------------------


def in_process_run(model: Path, data: Path, out: Path, **extra) -> tuple[dict, Trainer, str]:
    """A finished in-process run, its Trainer (closed), whose evaluator kept the last validation, and
    what it printed on stderr."""
    import contextlib
    import io

    cfg = load_config("quickstart", tiny_overrides(model, data, out, **extra))
    trainer = Trainer(cfg)
    log = io.StringIO()
    try:
        with contextlib.redirect_stderr(log):
            trainer.setup()
            summary = trainer.train()
    finally:
        trainer.close()
    return summary, trainer, log.getvalue()


def check_predict_matches_evaluation(trainer: Trainer, folder: Path) -> None:
    """`predict` on the raw validation texts gives the logits the run's last evaluation gave them."""
    from scalelora.predict import load_for_inference, load_long_text, text_logits

    step, _, outputs = trainer.evaluator.last
    assert step == trainer.state.global_step == trainer.state.best_step
    texts = dict(zip(trainer.splits.eval["idx"], trainer.splits.eval["text"]))
    model, tok, _, max_length = load_for_inference(folder)
    got = text_logits(
        model, tok, [texts[int(i)] for i in outputs.idx], max_length, 5, load_long_text(folder, max_length)
    )
    assert float((got - torch.from_numpy(outputs.logits)).abs().max()) < 1e-5


@pytest.fixture(scope="module")
def exact_model(tmp_path_factory) -> Path:
    return save_tiny_model(
        tmp_path_factory.mktemp("exact"), "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )


# the chunked LoRA run of this module: 16 documents a step, in one process here, in two below
CHUNK_RUN = {**CHUNK, **EXACT, "data.chunk_pool": "logmeanexp"}


@pytest.fixture(scope="module")
def chunk_one(exact_model, long_data, tmp_path_factory) -> tuple[Path, dict, Trainer, str]:
    out = tmp_path_factory.mktemp("chunk-one") / "run"
    return (out, *in_process_run(exact_model, long_data, out, **CHUNK_RUN, **{"train.batch_size": 16}))


def test_chunk_lora_run_scores_documents_alike_in_evaluation_predict_and_export(chunk_one, tmp_path, capsys):
    from scalelora.export import main as export_main

    out, summary, trainer, log = chunk_one
    record = summary["long_text"]
    assert record["long_text"] == "chunk" and record["chunk_pool"] == "logmeanexp"
    train = record["splits"]["train"]
    assert train["documents"] == 48 and train["over_max_chunks"] > 0 and train["windows_dropped"] > 0
    # the cap is logged with the count summary.json records
    assert (
        f"scalelora: long_text=chunk: train: 48 texts in {train['windows']} windows of up to 16 tokens"
        f" ({train['windows_per_document']:.2f} per text); {train['over_max_chunks']} texts" in log
    )
    assert (
        "needed more than data.max_chunks=3 windows: each kept its first 2 and its last "
        f"({train['windows_dropped']} windows dropped)" in log
    )
    assert train["windows"] > 48 and summary["eval"]["validation"]["num_examples"] == 16
    assert summary["eval"]["validation"]["unique_examples"] == 16
    # samples are documents; tokens are every window's real tokens (the work done)
    assert summary["steady_state"]["samples"] == 16 * (4 - 2)
    assert summary["steady_state"]["tokens"] > summary["steady_state"]["samples"] * 16
    adapter = out / "adapter"
    meta = json.loads((adapter / "scalelora.json").read_text())
    assert {k: meta[k] for k in ("long_text", "chunk_stride", "max_chunks", "chunk_pool", "clean_html")} == {
        "long_text": "chunk",
        "chunk_stride": 4,
        "max_chunks": 3,
        "chunk_pool": "logmeanexp",
        "clean_html": True,
    }
    check_predict_matches_evaluation(trainer, adapter)
    merged = tmp_path / "merged"
    assert export_main(["--adapter", str(adapter), "--merge", "--out", str(merged)]) == 0
    assert "plain transformers does not (it truncates every text)" in capsys.readouterr().out
    exported = json.loads((merged / "scalelora.json").read_text())
    assert (
        exported["long_text"] == "chunk" and exported["chunk_pool"] == "logmeanexp" and exported["clean_html"]
    )
    check_predict_matches_evaluation(trainer, merged)


def test_head_tail_and_chunk_train_in_full_mode_and_predict_as_evaluated(
    tiny_bert, long_data, tokenizer, tmp_path
):
    from scalelora.predict import main as predict_main

    # the chunked run also fits a temperature and per-class biases on its (pooled) validation documents
    calibrated = {"eval.calibrate": "true", "eval.tune_thresholds": "macro_f1"}
    for name, mode in (
        ("head_tail", HEAD_TAIL),
        ("chunk", {**CHUNK, "data.chunk_pool": "max", **calibrated}),
    ):
        summary, trainer, _ = in_process_run(
            tiny_bert, long_data, tmp_path / name, **{**EXACT, **mode, "model.mode": "full", "train.lr": 1e-3}
        )
        assert summary["mode"] == "full" and summary["long_text"]["long_text"] == name
        check_predict_matches_evaluation(trainer, tmp_path / name / "model")
    head_tail = read_summary(tmp_path / "head_tail")["long_text"]["splits"]["train"]
    assert head_tail["documents"] == 48 and 0 < head_tail["cut"] < 48
    # the share of tokens kept: of every text's tokens, those under max_length (a cut text keeps max_length)
    texts = [
        clean_html(json.loads(line)["text"]) for line in (long_data / "train.jsonl").read_text().splitlines()
    ]
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    kept = sum(min(n, HEAD_TAIL["data.max_length"]) for n in lengths) / sum(lengths)
    assert head_tail["tokens_kept_share"] == pytest.approx(kept) and kept < 1
    # `python -m scalelora.predict` on the raw validation file: the run's calibrated probabilities and
    # tuned decisions, document by document (validation ids are the file's rows)
    rule = trainer.evaluator.calibration
    assert rule.temperature is not None and rule.tuned
    _, _, outputs = trainer.evaluator.last
    order = np.argsort(outputs.idx)
    got = tmp_path / "predicted.jsonl"
    args = ["--adapter", str(tmp_path / "chunk"), "--input", str(long_data / "validation.jsonl")]
    assert predict_main([*args, "--output", str(got), "--batch-size", "5"]) == 0
    predicted = [json.loads(line) for line in got.read_text().splitlines()]
    probs = np.asarray([[p["probs"][k] for k in trainer.label_names] for p in predicted])
    assert np.abs(probs - rule.probabilities(outputs.logits)[order]).max() < 1e-5
    decided = [trainer.label_names[k] for k in rule.decide(outputs.logits)[order]]
    assert [p["label"] for p in predicted] == decided
    # the run's sample predictions read their documents as predict does (cleaned, windowed, pooled, calibrated)
    validation = (long_data / "validation.jsonl").read_text().splitlines()
    rows = {json.loads(line)["text"]: i for i, line in enumerate(validation)}
    assert summary["sample_predictions"]
    for sample in summary["sample_predictions"]:  # after training: the weights predict loads
        mine = predicted[rows[sample["text"]]]
        assert sample["after"] == mine["label"]
        assert sample["after_confidence"] == pytest.approx(mine["probs"][mine["label"]], abs=1e-5)


def train_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("split") == "train"]


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def predicted_probs(out: Path) -> np.ndarray:
    lines = (out / "predictions" / "validation.jsonl").read_text().splitlines()
    return np.asarray([json.loads(line)["probs"] for line in lines])


@pytest.fixture(scope="module")
def chunk_two(exact_model, long_data, chunk_one) -> Path:
    """The run of `chunk_one` on 2 processes with 8 documents each."""
    two = chunk_one[0].parent / "two"
    done = run_cli(
        "scalelora.train",
        ["--config", "quickstart", *tiny_overrides(exact_model, long_data, two, **CHUNK_RUN)],
        launcher=accelerate_launch(2, "cpu_2proc.yaml"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return two


def predict_probs(out: Path, data: Path) -> np.ndarray:
    """The saved adapter's softmax over the validation texts in id order, through `predict`."""
    from scalelora.predict import load_for_inference, load_long_text, text_logits

    texts = [json.loads(line)["text"] for line in (data / "validation.jsonl").read_text().splitlines()]
    model, tok, _, max_length = load_for_inference(out / "adapter")
    return torch.softmax(
        text_logits(model, tok, texts, max_length, 4, load_long_text(out, max_length)), dim=-1
    ).numpy()


@pytest.mark.slow
def test_two_processes_train_the_documents_of_one_process_with_twice_the_batch(
    chunk_one, chunk_two, long_data
):
    one, two = chunk_one[0], chunk_two
    assert read_summary(two)["world_size"] == 2
    assert train_losses(one) == pytest.approx(train_losses(two), rel=1e-5)
    ta, tb = adapter_tensors(one), adapter_tensors(two)
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], atol=2e-5, rtol=1e-4, msg=key)
    # each document evaluated once over the 2 ranks, as one pooled row
    validation = read_summary(two)["eval"]["validation"]
    assert validation["num_examples"] == 16 and validation["unique_examples"] == 16
    for run in (one, two):
        assert np.abs(predicted_probs(run) - predict_probs(run, long_data)).max() < 2e-5


@pytest.mark.slow
def test_zero2_trains_the_documents_as_plain_ddp(chunk_two, exact_model, long_data, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'scalelora[deepspeed]')")
    import os
    import sys

    out = tmp_path / "zero2"
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accel_configs" / "deepspeed_zero2.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
    ]
    cache = os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    done = run_cli(
        "scalelora.train",
        ["--config", "quickstart", *tiny_overrides(exact_model, long_data, out, **CHUNK_RUN)],
        env={"TORCH_EXTENSIONS_DIR": cache},
        launcher=launcher,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = read_summary(out)
    assert summary["deepspeed"]["zero_stage"] == 2 and summary["long_text"]["long_text"] == "chunk"
    ddp, zero = adapter_tensors(chunk_two), adapter_tensors(out)
    for key in ddp:
        torch.testing.assert_close(zero[key], ddp[key], atol=1e-5, rtol=1e-4, msg=key)
    assert np.abs(predicted_probs(out) - predict_probs(out, long_data)).max() < 2e-5


# --- distillation ---------------------------------------------------------------------------------


def test_teachers_and_their_logits_cache_score_each_document_as_the_student_does(
    tiny_bert, long_data, tmp_path
):
    from scalelora.teacher import CachedTeacher, ModelTeacher, SelfTeacher
    from scalelora.teacher_logits import build_cache
    from test_teacher import KD, loss_parts

    teacher = save_tiny_classifier(tmp_path / "teacher", tiny_bert)
    cfg = load_config(
        "quickstart", tiny_overrides(teacher, long_data, tmp_path / "student", **{**KD, **CHUNK})
    )
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        assert isinstance(trainer.teacher, SelfTeacher)
        # the batch of the longest documents (length-grouped batches)
        batch = max(trainer.train_loader, key=lambda b: b["doc"].shape[0])
        assert batch["doc"].shape[0] > 2 * batch["labels"].shape[0]
        with torch.no_grad():  # move the student away from its base so KL > 0
            for name, param in trainer.model.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    param.add_(torch.randn_like(param))
        from_self = loss_parts(trainer, batch)
        cfg.distill.teacher = str(teacher)
        trainer.teacher = ModelTeacher(
            cfg, trainer.label_names, trainer.tokenizer, trainer.accelerator.device
        )
        from_model = loss_parts(trainer, batch)
        manifest = build_cache(cfg, str(teacher), tmp_path / "cache", shard_size=40)
        assert manifest["long_text"] == LongText.from_config(cfg.data).record()
        trainer.teacher = CachedTeacher(
            tmp_path / "cache",
            trainer.splits.fingerprints["train"],
            trainer.label_names,
            trainer.accelerator.device,
            manifest["long_text"],
        )
        from_cache = loss_parts(trainer, batch)
        # by hand: the hard loss is the cross-entropy of each document's pooled (mean) window logits
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "idx", "doc")}
        with torch.no_grad():
            windows = trainer.model(**inputs).logits
        documents = torch.stack([windows[batch["doc"] == d].mean(dim=0) for d in range(len(batch["labels"]))])
        by_hand = torch.nn.functional.cross_entropy(documents, batch["labels"], reduction="sum")
    finally:
        trainer.close()
    torch.testing.assert_close(from_self["hard"], by_hand, rtol=1e-5, atol=1e-6)
    assert float(from_self["kd"]) > 0.05
    for parts in (from_model, from_cache):
        torch.testing.assert_close(parts["kd"], from_self["kd"], rtol=1e-5, atol=1e-6)
    # a student that reads long texts otherwise refuses the cache, and a build for other settings too
    with pytest.raises(DataError, match="scored long texts with"):
        CachedTeacher(
            tmp_path / "cache",
            trainer.splits.fingerprints["train"],
            trainer.label_names,
            torch.device("cpu"),
            LongText.from_config(load_config("quickstart", ["data.max_length=16"]).data).record(),
        )
    cfg.data.chunk_pool = "max"
    with pytest.raises(DataError, match="long_text: on disk"):
        build_cache(cfg, str(teacher), tmp_path / "cache", shard_size=40)
