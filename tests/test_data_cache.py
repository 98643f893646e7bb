"""The data path at scale (issue 27): the fast tokenizer path, truncation counts, the on-disk cache (reuse,
invalidation, one build per machine), passes over the rows in Arrow rather than Python rows, and the
progress lines. The large sizes are measured by benchmarks/data_scale.py, not here."""

from __future__ import annotations

import json
import random
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from conftest import (
    accelerate_launch,
    read_summary,
    run_cli,
    save_tiny_model,
    tiny_overrides,
    write_jsonl,
    write_toy_dataset,
)
from scalelora import data as data_lib
from scalelora import datacache, tokens
from scalelora.config import DataConfig, load_config
from scalelora.errors import DataError
from scalelora.models import cache_dir, load_tokenizer


class OneProcess:
    """What load_data asks of an Accelerator, for one process."""

    is_main_process = is_local_main_process = True
    num_processes = 1


@pytest.fixture(scope="module")
def minilm():
    from scalelora.config import ModelConfig

    return load_tokenizer(ModelConfig(name="minilm-l6"))


def texts(rng: random.Random, n: int, longest: int = 60) -> list[str]:
    words = ["hello", "world", "naïve", "日本語", "emoji😀", "x" * 30, "[SEP]", "<s>", "the"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, longest))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizers(minilm) -> list[Any]:
    """MiniLM's WordPiece, and SmolLM2's byte-level BPE where it is converted already."""
    from transformers import AutoTokenizer

    smollm = cache_dir() / "smollm2-135m"
    return [minilm] + (
        [AutoTokenizer.from_pretrained(smollm)] if (smollm / "tokenizer.json").is_file() else []
    )


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pair", [False, True])
def test_fast_tokenization_gives_the_ids_of_the_tokenizer_call(tokenizers, side, pair):
    rng = random.Random(0)
    first, second = texts(rng, 300), texts(rng, 300) if pair else None
    for tokenizer in tokenizers:
        tokenizer.truncation_side = side
        reference = tokenizer(first, second, truncation=True, max_length=32)
        columns, truncated = tokens.encode(tokenizer, first, second, 32)
        for key in reference:
            assert columns[key].to_pylist() == reference[key], (tokenizer.name_or_path, key)
        assert columns["length"].to_pylist() == [len(ids) for ids in reference["input_ids"]]
        assert (truncated == (tokens.token_lengths(tokenizer, first, second) > 32)).all()
        assert 0 < truncated.sum() < len(first)
        tokenizer.truncation_side = "right"


def write_rows(folder: Path, n: int, seed: int = 0, long_every: int = 0) -> Path:
    """A 2-class folder of `n` training rows (every `long_every`-th text 60 words), 40 validation rows."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("validation", 40)):
        rows = []
        for i in range(count):
            words = 60 if long_every and i % long_every == 0 else rng.randint(2, 12)
            rows.append(
                {
                    "text": " ".join(rng.choice(["good", "bad", "film", "plot"]) for _ in range(words)),
                    "label": ["neg", "pos"][i % 2],
                }
            )
        write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


def run_cfg(folder: Path, cache: Path, *overrides: str) -> Any:
    return load_config(
        "quickstart", [f"data.path={folder}", f"data.cache_dir={cache}", "data.test_split=null", *overrides]
    )


def test_truncated_rows_are_counted_logged_and_in_the_summary_and_report(tiny_bert, tmp_path, capsys):
    from scalelora import train

    data = write_rows(tmp_path / "data", 96, long_every=4)  # 24 of 96 texts of 62 tokens
    out = tmp_path / "out"
    capsys.readouterr()
    assert (
        train.main(
            ["--config", "quickstart", *tiny_overrides(tiny_bert, data, out, **{"data.test_split": "null"})]
        )
        == 0
    )
    err = capsys.readouterr().err
    summary = read_summary(out)
    assert summary["truncated"]["train"] == {"rows": 24, "share": 0.25}
    assert summary["truncated"]["validation"] == {"rows": 10, "share": 0.25}
    assert (
        "scalelora: warning: 25.0% of the train texts (24) are longer than data.max_length=32 tokens" in err
    )
    assert "truncated: train 24 (25.0%), validation 10 (25.0%)." in (out / "report.md").read_text()


def load(cfg: Any, tokenizer: Any, log: list[str] | None = None, choose: Any = None) -> tuple[Any, Any]:
    return data_lib.load_data(cfg, tokenizer, OneProcess(), (log if log is not None else []).append, choose)


def as_rows(tokenized: dict[str, Any]) -> dict[str, Any]:
    return {name: data_lib.arrow_table(ds).to_pydict() for name, ds in tokenized.items()}


def test_the_cache_gives_the_rows_and_tokens_memory_gives(minilm, tmp_path):
    folder = write_rows(tmp_path / "data", 300, long_every=7)
    memory = load(run_cfg(folder, tmp_path / "cache", "data.cache=never", "data.max_length=32"), minilm)
    cached = load(run_cfg(folder, tmp_path / "cache", "data.cache=always", "data.max_length=32"), minilm)
    mapped = load(run_cfg(folder, tmp_path / "cache", "data.cache=always", "data.max_length=32"), minilm)
    for splits, tokenized in (cached, mapped):
        assert splits.label_names == memory[0].label_names and splits.fingerprints == memory[0].fingerprints
        assert splits.truncated == memory[0].truncated and splits.truncated["train"]["rows"] == 43
        assert as_rows(tokenized) == as_rows(memory[1])
        assert splits.train["text"][:5] == memory[0].train["text"][:5]
    assert set(as_rows(memory[1])["train"]) == {
        "input_ids",
        "token_type_ids",
        "attention_mask",
        "length",
        "labels",
        "idx",
    }


def test_a_second_run_reuses_the_cache_and_an_edited_file_does_not(minilm, tmp_path, monkeypatch):
    reads: list[str] = []
    real_read = data_lib.read_split
    monkeypatch.setattr(data_lib, "read_split", lambda path: reads.append(path.name) or real_read(path))
    folder = write_rows(tmp_path / "data", 200)
    cache = tmp_path / "cache"
    cfg = run_cfg(folder, cache, "data.cache=always")
    first = load(cfg, minilm)
    assert reads == ["train.jsonl", "validation.jsonl"]
    log: list[str] = []
    second = load(cfg, minilm, log)
    assert reads == ["train.jsonl", "validation.jsonl"]  # nothing read, nothing tokenized again
    assert any("(reused)" in line for line in log) and any(
        "tokens at data.max_length=64: reused" in line for line in log
    )
    assert as_rows(second[1]) == as_rows(first[1])
    # another max_length: the rows are reused, the tokens are not
    third = load(run_cfg(folder, cache, "data.cache=always", "data.max_length=8"), minilm)
    assert reads == ["train.jsonl", "validation.jsonl"] and third[0].truncated["train"]["rows"] > 0
    # an edited file (one text changed, same size) is read again, and gives the edited text
    path = folder / "train.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[5])
    row["text"] = row["text"][::-1]
    lines[5] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    edited = load(cfg, minilm)
    assert reads[2:] == ["train.jsonl", "validation.jsonl"]
    assert edited[0].train["text"][5] == row["text"] != first[0].train["text"][5]
    assert edited[0].fingerprints["train"] != first[0].fingerprints["train"]
    # edits do not pile up: the folder keeps its KEEP most recently used entries
    for k in range(3):
        path.write_text(path.read_text() + json.dumps({"text": f"more {k}", "label": "pos"}) + "\n")
        load(cfg, minilm)
    folder_dir = next(cache.iterdir())
    assert len([p for p in folder_dir.iterdir() if p.name.startswith("rows-")]) == datacache.KEEP
    assert not [p for p in folder_dir.rglob(".*")]  # no temporary folder, no failure marker left


@pytest.mark.parametrize("cache", ["never", "always"])
def test_auto_cleans_the_markup_it_finds_and_measures_the_texts_as_the_run_reads_them(
    minilm, tmp_path, cache
):
    """In memory and through the disk cache: 25% of the training texts carry `<br />` markup, so the
    auto default cleans it, its length sample is of the cleaned texts and the tokens hold no markup;
    `data.clean_html=false` set by the user wins, and the lengths are then of the texts as written."""
    from scalelora import autoconfig

    folder = write_rows(tmp_path / "data", 60)
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        if i % 4 == 0:
            row["text"] = row["text"].replace(" ", " <br /><br /> ", 1)
    write_jsonl(folder / "train.jsonl", rows)

    def auto(*overrides: str) -> tuple[Any, Any, Any, Any]:
        cfg = load_config(
            "auto",
            [
                f"data.path={folder}",
                f"data.cache_dir={tmp_path / 'cache'}",
                f"data.cache={cache}",
                *overrides,
            ],
        )
        seen = []

        def choose(splits: Any, sample: Any) -> None:
            seen.append(sample)
            autoconfig.choose_from_data(cfg, splits, sample, minilm, 1)

        splits, tokenized = load(cfg, minilm, choose=choose)
        return cfg, splits, tokenized, seen[0]

    cfg, splits, tokenized, sample = auto()
    assert sample.markup == 0.25 and cfg.data.clean_html is True
    raw = autoconfig.length_sample(splits.train, minilm)
    cleaned = autoconfig.length_sample(splits.train, minilm, clean_html=True)
    assert (raw > cleaned).sum() == 15 and (sample.lengths == cleaned).all()
    markup = set(minilm.convert_tokens_to_ids(["<", "br", ">"]))
    assert not any(markup & set(ids) for ids in as_rows(tokenized)["train"]["input_ids"])
    measured = sorted(p.name.split("-", 2)[-1] for p in (tmp_path / "cache").rglob("lengths-*.npy"))
    cfg, _, tokenized, sample = auto("data.clean_html=false")
    assert cfg.data.clean_html is False and (sample.lengths == raw).all()
    assert sum(bool(markup & set(ids)) for ids in as_rows(tokenized)["train"]["input_ids"]) == 15
    if cache == "always":  # one length sample per way of reading the texts
        assert measured == ["clean_html.npy"]
        assert len(list((tmp_path / "cache").rglob("lengths-*.npy"))) == 2


def test_auto_uses_the_disk_cache_from_32_mib_and_memory_below(tmp_path, monkeypatch):
    folder = write_rows(tmp_path / "data", 50)
    assert datacache.plan(DataConfig(path=str(folder)), 0) is None
    monkeypatch.setattr(datacache, "DISK_MIN_BYTES", 1_000)
    assert datacache.plan(DataConfig(path=str(folder)), 0) is not None
    assert datacache.plan(DataConfig(path=str(folder), cache="never"), 0) is None


class Rank:
    def __init__(self, rank: int) -> None:
        self.process_index = rank
        self.is_main_process = self.is_local_main_process = rank == 0
        self.num_processes = 2


def two_ranks(monkeypatch: pytest.MonkeyPatch, body: Any) -> list[Any]:
    """Run `body(rank)` for ranks 0 and 1 in threads named rank-0 and rank-1, with `gather_object` and
    `broadcast_object_list` as 2-rank exchanges."""
    import accelerate.utils

    barrier, slots = threading.Barrier(2), [None, None]
    state = threading.local()

    def gather(items: list[Any]) -> list[Any]:
        slots[state.rank] = items[0]
        barrier.wait(timeout=30)
        everyone = list(slots)
        barrier.wait(timeout=30)  # both have read the slots before the next exchange writes them
        return everyone

    def broadcast(items: list[Any], from_process: int = 0) -> list[Any]:
        items[:] = gather([list(items)])[from_process]
        return items

    monkeypatch.setattr(accelerate.utils, "gather_object", gather)
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)
    outcomes: list[Any] = [None, None]

    def run(rank: int) -> None:
        state.rank = rank
        try:
            outcomes[rank] = body(Rank(rank))
        except Exception as err:  # noqa: BLE001 - handed to the test
            outcomes[rank] = err

    threads = [threading.Thread(target=run, args=(r,), name=f"rank-{r}") for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return outcomes


def test_one_process_per_machine_builds_and_the_others_wait_and_share_its_error(tmp_path, monkeypatch):
    ready = tmp_path / "entry" / "meta.json"
    built: list[int] = []

    def build_for(rank: Any) -> Any:
        def build() -> None:
            built.append(rank.process_index)
            ready.parent.mkdir()
            ready.write_text("{}")

        return datacache.on_each_machine(rank, build, [ready], "nonce")

    assert two_ranks(monkeypatch, build_for) == [None, None]
    assert built == [0]

    def failing(rank: Any) -> Any:
        def build() -> None:
            raise DataError("train.jsonl:3: not valid JSON")

        return datacache.on_each_machine(rank, build, [tmp_path / "never" / "meta.json"], "nonce2")

    errors = two_ranks(monkeypatch, failing)
    assert [type(e).__name__ for e in errors] == ["DataError", "DataError"]
    assert [str(e) for e in errors] == ["train.jsonl:3: not valid JSON"] * 2
    assert not (tmp_path / "never" / ".failed-nonce2").exists()


def mapped_files() -> list[tuple[int, int, str]]:
    """This process's file mappings: (start, end, path)."""
    maps = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            maps.append((start, end, fields[5]))
    return maps


def backing_file(column: pa.ChunkedArray) -> str | None:
    """The file whose mapping holds the values of the column's first chunk (None: ordinary memory)."""
    values = column.chunk(0)
    if pa.types.is_list(values.type):
        values = values.values
    address = values.buffers()[-1].address
    return next((path for start, end, path in mapped_files() if start <= address < end), None)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps (Linux)")
def test_the_second_rank_maps_what_the_local_main_process_built(minilm, tmp_path, monkeypatch):
    """2 ranks of one machine: rank 0 reads and tokenizes, rank 1 neither reads a file nor tokenizes, and
    both hold the rows and tokens as mappings of the cache's files, not copies in their own memory."""
    folder = write_rows(tmp_path / "data", 300)
    work: list[str] = []
    real_read, real_tokenize = data_lib.read_split, tokens.tokenize_batches
    monkeypatch.setattr(
        data_lib, "read_split", lambda path: work.append(threading.current_thread().name) or real_read(path)
    )
    monkeypatch.setattr(
        tokens,
        "tokenize_batches",
        lambda *a, **k: work.append(threading.current_thread().name) or real_tokenize(*a, **k),
    )
    cfg = run_cfg(folder, tmp_path / "cache", "data.cache=always")
    loaded = two_ranks(monkeypatch, lambda rank: data_lib.load_data(cfg, minilm, rank, lambda line: None))
    assert not [o for o in loaded if isinstance(o, Exception)], loaded
    assert set(work) == {"rank-0"}
    for splits, tokenized in loaded:
        rows = backing_file(data_lib.arrow_column(splits.train, "text"))
        ids = backing_file(data_lib.arrow_column(tokenized["train"], "input_ids"))
        assert rows is not None and rows.startswith(str(tmp_path / "cache")) and rows.endswith("train.arrow")
        assert ids is not None and "/tokens-" in ids and ids.endswith("train.arrow")
    assert as_rows(loaded[0][1]) == as_rows(loaded[1][1])


@pytest.mark.slow
def test_two_processes_map_one_cache_and_train_as_one_process_does(toy_data, tmp_path):
    model = save_tiny_model(
        tmp_path / "bert", "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    settings = {
        "data.group_by_length": "false",
        "lora.dropout": 0.0,
        "train.max_steps": 3,
        "train.log_every": 1,
    }
    settings |= {"eval.every": 3, "data.cache_dir": str(tmp_path / "cache"), "data.test_split": "null"}
    one = tmp_path / "one"
    overrides = tiny_overrides(
        model, toy_data, one, **{**settings, "train.batch_size": 16, "data.cache": "never"}
    )
    result = run_cli("scalelora.train", ["--config", "quickstart", *overrides])
    assert result.returncode == 0, result.stderr[-2000:]
    two = tmp_path / "two"
    overrides = tiny_overrides(
        model, toy_data, two, **{**settings, "train.batch_size": 8, "data.cache": "always"}
    )
    result = run_cli(
        "scalelora.train",
        ["--config", "quickstart", *overrides],
        launcher=accelerate_launch(2, "cpu_2proc.yaml"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        read_summary(two)["world_size"] == 2
        and read_summary(two)["truncated"] == read_summary(one)["truncated"]
    )
    losses = [
        [json.loads(x)["loss"] for x in (o / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
        for o in (one, two)
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    (folder_dir,) = (tmp_path / "cache").iterdir()
    (rows_dir,) = folder_dir.iterdir()
    assert len([p for p in rows_dir.iterdir() if p.name.startswith("tokens-")]) == 1
    assert not list(folder_dir.rglob(".*"))


def test_no_pass_over_200k_rows_goes_through_python_rows(tmp_path, monkeypatch):
    """Loading, label checks, fingerprints, class weights, length checks and the loaders' samplers read
    columns in Arrow: datasets' row formatter (about 2 s per 200k rows) and the line-by-line readers are
    never used on a clean file."""
    import datasets

    n = 200_000
    rng = np.random.default_rng(0)
    folder = tmp_path / "big"
    folder.mkdir()
    words = np.array(["good", "bad", "film", "plot", "slow", "fun"])
    for split, count in (("train", n), ("validation", 2_000)):
        labels = rng.integers(1, 4, size=count)  # integer labels 1..3
        body = words[rng.integers(0, len(words), size=(count, 3))]
        lines = [f'{{"text": "{" ".join(b)}", "label": {int(v)}}}\n' for b, v in zip(body.tolist(), labels)]
        (folder / f"{split}.jsonl").write_text("".join(lines))

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a pass over the rows in Python")

    monkeypatch.setattr(datasets.arrow_dataset, "format_table", forbidden)
    monkeypatch.setattr(data_lib, "find_bad_line", forbidden)
    monkeypatch.setattr(data_lib, "load_with_datasets", forbidden)
    cfg = DataConfig(path=str(folder), test_split=None)
    splits = data_lib.load_splits(cfg, seed=0)
    assert splits.label_names == ["1", "2", "3"] and len(splits.train) == n
    weights = data_lib.class_weights("balanced", splits.label_names, splits.train)
    assert len(weights) == 3
    lengths = pa.array(rng.integers(3, 9, size=n).astype(np.int32))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths.to_numpy())]).astype(np.int32))
    ids = pa.ListArray.from_arrays(offsets, pa.array(np.ones(int(offsets[-1].as_py()), np.int32)))
    fake = data_lib.to_dataset(
        pa.table(
            {
                "input_ids": ids,
                "length": lengths,
                "labels": data_lib.arrow_column(splits.train, "label"),
                "idx": data_lib.arrow_column(splits.train, "idx"),
            }
        ),
        "fake",
    )
    data_lib.check_lengths({"train": fake}, 512, "m")
    for balanced in (False, True):
        loader = data_lib.train_dataloader(
            fake, DataConfig(class_balanced=balanced), 32, 0, data_lib.PadCollator(0)
        )
        assert len(list(iter(loader.sampler))) == n
    data_lib.eval_dataloader(fake, 64, data_lib.PadCollator(0))


def test_a_jsonl_line_with_two_objects_is_named_not_read_as_two_rows(tmp_path):
    folder = write_toy_dataset(tmp_path / "data")
    path = folder / "train.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2] + " " + lines[3]  # Arrow's reader takes this line as two rows
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:3: not valid JSON \(Extra data\)"):
        data_lib.load_splits(DataConfig(path=str(folder)), seed=0)


def test_the_first_data_line_comes_before_any_file_is_read(minilm, tmp_path, monkeypatch):
    folder = write_rows(tmp_path / "data", 50)
    log: list[str] = []
    seen_at_first_read: list[int] = []
    real_read = data_lib.read_split
    monkeypatch.setattr(
        data_lib, "read_split", lambda path: seen_at_first_read.append(len(log)) or real_read(path)
    )
    for cache in ("never", "always"):
        log.clear(), seen_at_first_read.clear()
        load(run_cfg(folder, tmp_path / "cache", f"data.cache={cache}"), minilm, log)
        assert seen_at_first_read[0] >= 1 and log[0].startswith(f"scalelora: data: {folder} (")
        # every step says what it did and how long it took
        steps = [line for line in log if line.startswith("scalelora: data:")][1:]
        assert steps and all(line.endswith(" s)") or "reused" in line for line in steps), steps


@pytest.mark.parametrize("cache", ["never", "always"])
def test_a_single_class_training_split_is_refused_in_memory_and_through_the_cache(minilm, tmp_path, cache):
    folder = write_rows(tmp_path / "data", 30)
    path = folder / "train.jsonl"
    write_jsonl(path, [{**json.loads(line), "label": "pos"} for line in path.read_text().splitlines()])
    (folder / "labels.json").write_text('["neg", "pos"]')  # else 'neg' in validation is the first error
    with pytest.raises(DataError, match=rf"{path}: every training row has the label 'pos'"):
        load(run_cfg(folder, tmp_path / "cache", f"data.cache={cache}"), minilm)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("meta.json"))


def whole_file_bad_line(path: Path) -> str | None:
    """The first bad line as reading every line in Python names it (what the block scan must agree with)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        number = raw.count(b"\n", 0, bad.start) + 1
        return f"{path}:{number}: not UTF-8 text (byte 0x{raw[bad.start]:02x}); save the file as UTF-8"
    if not text.strip():
        return f"{path}: the file has no rows; fill it with rows or remove it"
    return data_lib.first_bad_json_line(path, text.splitlines(keepends=True))


def test_the_block_scan_names_the_line_reading_every_line_would_name(tmp_path, monkeypatch):
    """Blocks far smaller than a line too: a bad line anywhere, of each kind, is named with its number."""
    monkeypatch.setattr(data_lib, "SCAN_BLOCK_BYTES", 97)
    rng = random.Random(0)
    bad_kinds = [
        b'{"text": "a", "label": 1',
        b'{"text": "a"} {"text": "b"}',
        b"[1, 2]",
        b'"x"',
        b'{"t": "\xe9"}',
    ]
    path = tmp_path / "train.jsonl"
    for case in range(60):
        lines = [
            json.dumps(
                {"text": " ".join(texts(rng, 1, longest=rng.choice([3, 60]))), "label": i % 3}
            ).encode()
            for i in range(rng.randint(1, 40))
        ]
        for _ in range(rng.randint(0, 3)):
            lines.insert(rng.randint(0, len(lines)), b"")
        if case % 6:
            lines[rng.randrange(len(lines))] = rng.choice(bad_kinds)
        path.write_bytes(b"\n".join(lines) + rng.choice([b"\n", b""]))
        assert data_lib.find_bad_line(path) == whole_file_bad_line(path), path.read_bytes()
    path.write_bytes(b"\n\n")
    assert data_lib.find_bad_line(path) == f"{path}: the file has no rows; fill it with rows or remove it"


def test_a_bad_line_deep_in_a_large_file_is_named_without_parsing_every_line_in_python(tmp_path, monkeypatch):
    n, bad = 200_000, 150_001
    lines = [f'{{"text": "row {i}", "label": {i % 2}}}\n' for i in range(n)]
    lines[bad - 1] = '{"text": "row", "label": 1,}\n'
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(lines))
    (folder / "validation.jsonl").write_text("".join(lines[:10]))
    parsed = []
    real_loads = json.loads
    monkeypatch.setattr(json, "loads", lambda text, *a, **k: parsed.append(1) or real_loads(text, *a, **k))
    with pytest.raises(DataError, match=rf"train.jsonl:{bad}: not valid JSON"):
        data_lib.load_splits(DataConfig(path=str(folder), test_split=None), seed=0)
    assert len(parsed) < 50_000  # one block of about SCAN_BLOCK_BYTES, not the 150,000 lines before it


def test_the_cache_lives_under_data_cache_dir_else_scalelora_cache(tmp_path, monkeypatch):
    folder = write_rows(tmp_path / "data", 20)
    monkeypatch.setenv("SCALELORA_CACHE", str(tmp_path / "env"))
    default = datacache.plan(DataConfig(path=str(folder), cache="always"), 0)
    assert default.rows_dir.parent.parent == tmp_path / "env" / "data"
    assert default.rows_dir.parent.name.startswith("data-") and default.rows_dir.name.startswith("rows-")
    given = datacache.plan(DataConfig(path=str(folder), cache="always", cache_dir=str(tmp_path / "c")), 0)
    assert given.rows_dir.parent.parent == tmp_path / "c"
    # a setting that changes neither rows nor tokens keeps the entry; one that changes rows does not
    same = datacache.plan(DataConfig(path=str(folder), cache="always", num_workers=2), 0)
    other = datacache.plan(DataConfig(path=str(folder), cache="always", drop_empty=True), 0)
    assert same.rows_dir == default.rows_dir != other.rows_dir


def test_the_tokens_entry_is_keyed_by_the_tokenizer_and_the_truncation_side(minilm, tmp_path):
    import copy

    folder = write_rows(tmp_path / "data", 20)
    plan = datacache.plan(DataConfig(path=str(folder), cache="always", cache_dir=str(tmp_path / "c")), 0)
    grown = copy.deepcopy(minilm)
    grown.add_tokens(["filmplot"])
    left = copy.deepcopy(minilm)
    left.truncation_side = "left"
    entries = {plan.tokens_dir(t) for t in (minilm, copy.deepcopy(minilm), grown, left)}
    assert len(entries) == 3  # an equal copy shares the entry; another vocabulary or side does not
    side = datacache.plan(
        DataConfig(path=str(folder), cache="always", cache_dir=str(tmp_path / "c"), truncation_side="left"), 0
    )
    assert side.rows_dir == plan.rows_dir and side.tokens_dir(minilm) != plan.tokens_dir(minilm)


def test_a_terminal_gets_a_progress_bar_and_a_log_gets_one_line_per_step(monkeypatch):
    import sys

    import tqdm.auto

    bars: list[Any] = []

    class Bar:
        def __init__(self, **kwargs: Any) -> None:
            self.total, self.done, self.closed = kwargs["total"], 0, False
            bars.append(self)

        def update(self, n: int) -> None:
            self.done += n

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    for terminal in (True, False):
        monkeypatch.setattr(sys.stderr, "isatty", lambda terminal=terminal: terminal)
        log: list[str] = []
        with data_lib.stage(log.append, "tokenize train", total=300) as done:
            done.advance(200)
            done.advance(100)
            done("300 rows")
        assert len(log) == 1 and re.fullmatch(
            r"scalelora: data: tokenize train: 300 rows \(\d+\.\d s\)", log[0]
        )
    assert len(bars) == 1 and bars[0].done == 300 and bars[0].closed


@pytest.mark.parametrize("cache", ["never", "always"])
@pytest.mark.parametrize(
    ("mode", "label"),
    [
        ("truncate", "truncated"),
        ("head_tail", "cut to head and tail (over 32 tokens)"),
        ("chunk", "over data.max_chunks=2 windows"),
    ],
)
def test_the_tokenize_line_names_what_its_count_of_texts_not_read_whole_counts(
    tiny_bert, tmp_path, cache, mode, label
):
    """In memory and through the disk cache: under head_tail a long text is cut to its head and tail, under
    chunk one over data.max_chunks loses windows; "truncated" is said of truncate alone."""
    from transformers import AutoTokenizer

    data = write_rows(tmp_path / "data", 96, long_every=4)  # 24 of 96 texts of 62 tokens
    extra = ["data.max_length=32", f"data.long_text={mode}", "data.max_chunks=2", f"data.cache={cache}"]
    log: list[str] = []
    load(run_cfg(data, tmp_path / "cache", *extra), AutoTokenizer.from_pretrained(tiny_bert), log)
    (line,) = [line for line in log if line.startswith("scalelora: data: tokenize train: ")]
    assert line.startswith(f"scalelora: data: tokenize train: 96 rows, 24 {label}, "), line
