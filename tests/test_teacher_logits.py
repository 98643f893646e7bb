"""`python -m scalelora.teacher_logits`: manifest, refusal of mismatched caches, resume after an
interruption, a teacher with another tokenizer, and a 2-process build without duplicates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import accelerate_launch, read_summary, run_cli, save_tiny_classifier, tiny_overrides
from scalelora import teacher_logits
from scalelora.config import load_config
from scalelora.data import load_splits
from scalelora.errors import DataError
from scalelora.teacher import CachedTeacher
from scalelora.train import main as train_main


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_bert) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("logit-teacher"), tiny_bert)


def build_args(teacher: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--teacher",
        str(teacher),
        "--config",
        "quickstart",
        "--out",
        str(out),
        "--shard-size",
        "40",
        f"data.path={data}",
        "data.max_length=32",
        "train.precision=no",  # float32 logits on any host (`auto` is bf16 on a recent GPU)
        *extra,
    ]


def shard_rows(out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    manifest = json.loads((out / "manifest.json").read_text())
    shards = [load_file(str(out / name)) for name in manifest["splits"]["train"]["shards"]]
    return torch.cat([s["idx"] for s in shards]), torch.cat([s["logits"] for s in shards])


def direct_logits(teacher: Path, texts: list[str]) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    tok = AutoTokenizer.from_pretrained(teacher)
    with torch.no_grad():
        return torch.cat(
            [model(**tok(t, truncation=True, max_length=32, return_tensors="pt")).logits for t in texts]
        )


def test_cache_has_a_manifest_and_every_example_once(teacher, toy_data, tmp_path):
    out = tmp_path / "cache"
    assert teacher_logits.main(build_args(teacher, toy_data, out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    cfg = load_config("quickstart", [f"data.path={toy_data}", "data.max_length=32"])
    splits = load_splits(cfg.data, cfg.seed)
    train = manifest["splits"]["train"]
    assert manifest["label_names"] == ["neg", "pos"] and manifest["max_length"] == 32
    assert manifest["teacher"] == teacher_logits.teacher_identity(str(teacher))
    assert manifest["teacher"]["path"] == str(teacher.resolve()) and len(manifest["teacher"]["hash"]) == 16
    assert train["fingerprint"] == splits.fingerprints["train"] and train["num_examples"] == 96
    assert train["complete"] is True and train["shards"] == [f"train-0000{k}.safetensors" for k in range(3)]
    idx, logits = shard_rows(out)
    assert sorted(idx.tolist()) == list(range(96))
    # the cached logits are the teacher's own, keyed by example id
    by_id = dict(zip(splits.train["idx"], splits.train["text"]))
    torch.testing.assert_close(
        logits[:5], direct_logits(teacher, [by_id[int(i)] for i in idx[:5]]), atol=1e-5, rtol=1e-4
    )


def test_a_cache_for_other_data_or_labels_is_refused(teacher, toy_data, tmp_path, capsys):
    out = tmp_path / "cache"
    assert teacher_logits.main(build_args(teacher, toy_data, out)) == 0
    fingerprint = json.loads((out / "manifest.json").read_text())["splits"]["train"]["fingerprint"]
    with pytest.raises(DataError, match="built for other training data"):
        CachedTeacher(out, "0123456789abcdef", ["neg", "pos"], torch.device("cpu"))
    with pytest.raises(DataError, match=r"has labels \['neg', 'pos'\], the data has \['pos', 'neg'\]"):
        CachedTeacher(out, fingerprint, ["pos", "neg"], torch.device("cpu"))

    # a student training on another subset than the cache was built for: one clear line, exit 2
    student = tiny_overrides(
        teacher,
        toy_data,
        tmp_path / "student",
        **{
            "distill.enabled": "true",
            "distill.teacher": "cache",
            "distill.cache_dir": out,
            "data.max_train_samples": 50,
        },
    )
    capsys.readouterr()
    assert train_main(["--config", "quickstart", *student]) == 2
    err = capsys.readouterr().err
    assert (
        "scalelora: error: teacher-logit cache" in err
        and "other training data" in err
        and "Traceback" not in err
    )

    # rebuilding into the same folder for other data needs --overwrite
    assert teacher_logits.main(build_args(teacher, toy_data, out, "data.max_train_samples=50")) == 2
    assert "was built for something else (splits.train.fingerprint" in capsys.readouterr().err
    assert (
        teacher_logits.main(build_args(teacher, toy_data, out, "--overwrite", "data.max_train_samples=50"))
        == 0
    )
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["num_examples"] == 50


def test_an_interrupted_build_resumes_where_it_stopped(teacher, toy_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cache"
    real = teacher_logits.shard_logits
    calls = []

    def crash_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")  # as if the job died while computing shard 1
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_logits, "shard_logits", crash_on_second_shard)
    with pytest.raises(RuntimeError, match="killed"):
        teacher_logits.main(build_args(teacher, toy_data, out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["complete"] is False
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["train-00000.safetensors"]
    with pytest.raises(DataError, match="incomplete"):
        CachedTeacher(out, manifest["splits"]["train"]["fingerprint"], ["neg", "pos"], torch.device("cpu"))
    first_mtime = (out / "train-00000.safetensors").stat().st_mtime_ns

    monkeypatch.setattr(teacher_logits, "shard_logits", real)
    capsys.readouterr()
    assert teacher_logits.main(build_args(teacher, toy_data, out)) == 0
    assert "2 shard(s) computed, 1 kept from an earlier build" in capsys.readouterr().err
    assert (out / "train-00000.safetensors").stat().st_mtime_ns == first_mtime
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["complete"] is True
    resumed_idx, resumed = shard_rows(out)
    assert (
        teacher_logits.main(build_args(teacher, tmp_path / "fresh", tmp_path / "fresh")) == 2
    )  # no data there
    assert teacher_logits.main(build_args(teacher, toy_data, tmp_path / "fresh")) == 0
    fresh_idx, fresh = shard_rows(tmp_path / "fresh")
    assert torch.equal(resumed_idx, fresh_idx) and torch.equal(resumed, fresh)


def test_teacher_with_another_tokenizer_works_through_the_cache_on_a_subset(tiny_bert, toy_data, tmp_path):
    from transformers import AutoTokenizer

    small_vocab = AutoTokenizer.from_pretrained(tiny_bert).train_new_from_iterator(
        ["the film was great", "dull boring plot", "a lovely story"] * 20, vocab_size=150
    )
    other = save_tiny_classifier(tmp_path / "other-tok", tiny_bert, tokenizer=small_vocab)
    out = tmp_path / "cache"
    # a 30-example subset: ids go up to 95, beyond the number of cached rows
    assert teacher_logits.main(build_args(other, toy_data, out, "data.max_train_samples=30")) == 0
    idx, _ = shard_rows(out)
    assert len(idx) == 30 and int(idx.max()) > 30
    run = tmp_path / "student"
    args = tiny_overrides(
        tiny_bert,
        toy_data,
        run,
        **{
            "distill.enabled": "true",
            "distill.teacher": "cache",
            "distill.cache_dir": out,
            "data.max_train_samples": 30,
            "train.max_steps": 2,
        },
    )
    assert train_main(["--config", "quickstart", *args]) == 0
    assert read_summary(run)["distill"]["teacher"] == "cache"


@pytest.mark.slow
def test_two_processes_write_disjoint_shards_matching_one_process(teacher, toy_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert teacher_logits.main(build_args(teacher, toy_data, one, "--shard-size", "16")) == 0
    result = run_cli(
        "scalelora.teacher_logits",
        build_args(teacher, toy_data, two, "--shard-size", "16"),
        launcher=accelerate_launch(2, "cpu_2proc.yaml"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: split train: 3 shard(s) computed" in result.stderr
    assert "rank 1: split train: 3 shard(s) computed" in result.stderr
    idx2, logits2 = shard_rows(two)
    assert sorted(idx2.tolist()) == list(range(96))  # every example exactly once, no padding duplicates
    idx1, logits1 = shard_rows(one)
    assert torch.equal(idx1, idx2)
    torch.testing.assert_close(logits1, logits2, atol=1e-5, rtol=1e-5)
    assert json.loads((two / "manifest.json").read_text())["splits"]["train"]["complete"] is True


def test_shard_logits_batches_by_length_and_returns_the_rows_in_order(teacher):
    """Texts of mixed lengths (shortest last): batched by length, each row still gets its own logits."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["good " * n + "film" for n in (9, 1, 14, 4, 0, 7, 2)]
    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    tok = AutoTokenizer.from_pretrained(teacher)
    padded_to: list[int] = []
    real_call = type(tok).__call__

    def recording(self, *args, **kwargs):
        encoded = real_call(self, *args, **kwargs)
        padded_to.append(int(encoded["input_ids"].shape[1]))
        return encoded

    type(tok).__call__ = recording
    try:
        got = teacher_logits.shard_logits(model, tok, texts, None, 32, 3, torch.device("cpu"))
    finally:
        type(tok).__call__ = real_call
    torch.testing.assert_close(got, direct_logits(teacher, texts), rtol=0, atol=1e-5)
    # sorted: the 3 shortest texts (0, 1, 2 repeats + "film") come first, padded to the longest of them
    assert padded_to[0] == len(tok(texts[6])["input_ids"])


def test_the_teacher_runs_with_the_configs_attention_and_precision(
    teacher, toy_data, tmp_path, monkeypatch, capsys
):
    """The student's config (and its overrides) sets the teacher's model.attn_implementation and
    train.precision; the manifest records the precision, and a build in another one is refused."""
    from scalelora import runtime

    real = teacher_logits.load_frozen_teacher
    seen: dict = {}

    def recording(*args, **kwargs):
        model, tokenizer, temperature = real(*args, **kwargs)
        seen["attn"] = model.config._attn_implementation
        layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        layer.register_forward_hook(lambda module, args, output: seen["dtypes"].add(output.dtype))
        return model, tokenizer, temperature

    monkeypatch.setattr(teacher_logits, "load_frozen_teacher", recording)
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    for out, settings, attn, dtype in (
        (fp32, ["model.attn_implementation=sdpa"], "sdpa", torch.float32),
        (bf16, ["train.precision=bf16", "model.attn_implementation=eager"], "eager", torch.bfloat16),
    ):
        seen["dtypes"] = set()
        assert teacher_logits.main(build_args(teacher, toy_data, out, *settings)) == 0
        assert (seen["attn"], seen["dtypes"]) == (attn, {dtype})
    assert json.loads((fp32 / "manifest.json").read_text())["precision"] == "no"
    assert json.loads((bf16 / "manifest.json").read_text())["precision"] == "bf16"
    idx, exact = shard_rows(fp32)
    idx_bf16, rounded = shard_rows(bf16)
    assert torch.equal(idx, idx_bf16) and rounded.dtype == torch.float32
    assert not torch.equal(rounded, exact)
    torch.testing.assert_close(rounded, exact, atol=0.1, rtol=0.05)

    # finishing (or reusing) a cache in another precision is refused
    capsys.readouterr()
    assert teacher_logits.main(build_args(teacher, toy_data, bf16)) == 2
    assert "precision: on disk 'bf16', now 'no'" in capsys.readouterr().err
    # a cache written before the precision was recorded was computed in float32
    manifest = json.loads((fp32 / "manifest.json").read_text())
    del manifest["precision"]
    (fp32 / "manifest.json").write_text(json.dumps(manifest))
    assert teacher_logits.main(build_args(teacher, toy_data, fp32)) == 0

    # `auto` is resolved as training resolves it, and logged (mocked: a CPU measured faster in bf16)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"amx_bf16", "avx512_bf16"})
    monkeypatch.setattr(runtime, "CPU_BF16_MEASURED", {"amx_bf16": (True, "a measurement")})
    seen["dtypes"] = set()
    assert teacher_logits.main(build_args(teacher, toy_data, tmp_path / "auto", "train.precision=auto")) == 0
    assert seen["dtypes"] == {torch.bfloat16}
    assert "scalelora: auto: train.precision=bf16 (CPU with amx_bf16" in capsys.readouterr().err
