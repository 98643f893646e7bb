"""The benchmark: it runs both sides end to end in smoke mode and writes its JSON; its pieces (shapes
of the GPU scenarios' models, the timing window, the ratios, the teacher cache) are right. No timings
are asserted: they depend on the machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import bench
from conftest import run_cli


def test_smoke_runs_both_sides_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # one whole epoch of 32 rows (4 steps of 8: 1 warm-up, 3 timed), so both sides also report accuracy
    args = ["--scenario", "cpu-minilm-rt", "--smoke", "--epochs", "1", "--max-train-samples", "32"]
    done = run_cli("scalelora.bench", [*args, "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["scenario"] == "cpu-minilm-rt" and report["smoke"] is True
    assert set(report["sides"]) == {bench.HF, bench.SCALELORA}
    for side in report["sides"].values():
        run = side["repeats"][0]
        assert run["timed_steps"] == 3 and run["warmup_steps"] == 1 and run["optimizer_steps"] == 4
        assert run["samples"] == 3 * 8  # three timed steps of batch 8
        assert 0 < run["tokens"] <= run["padded_tokens"]
        assert side["samples_per_second"] > 0 and side["peak_memory_bytes"] > 0
        assert side["peak_memory_kind"] == "rss"
        assert 0.0 <= side["validation_accuracy"] <= 1.0
    # both sides train the same weights: LoRA on query/value plus the classifier head
    hf_run = report["sides"][bench.HF]["repeats"][0]
    ours = report["sides"][bench.SCALELORA]["repeats"][0]
    assert hf_run["trainable_params"] == ours["trainable_params"]
    assert report["ratio"] == pytest.approx(
        ours["samples_per_second"] / hf_run["samples_per_second"], rel=1e-9
    )
    assert "ratio:" in done.stdout


@pytest.mark.slow
def test_smoke_kd_sides_train_from_cache_and_self(tmp_path: Path) -> None:
    out = tmp_path / "kd.json"
    sides = f"{bench.SCALELORA},{bench.KD_CACHE},{bench.KD_SELF}"
    done = run_cli(
        "scalelora.bench", ["--scenario", "cpu-minilm-kd", "--smoke", "--sides", sides, "--out", str(out)]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["sides"]) == {bench.SCALELORA, bench.KD_CACHE, bench.KD_SELF}
    assert report["kd_cache_step_ratio"] > 0 and report["kd_self_step_ratio"] > 0
    assert report["ratio"] is None  # no HF side asked for
    # a few steps say nothing about accuracy: the report leaves it out rather than print noise
    assert all(side["validation_accuracy"] is None for side in report["sides"].values())


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["gpu-distilbert", "gpu-roberta", "gpu-gpt2", "gpu-qwen0.5b"])
def test_smoke_gpu_scenarios_run_on_cpu(tmp_path: Path, scenario: str) -> None:
    """The GPU scenarios' code paths (config-built models, no token_type_ids, decoder pad tokens) on tiny same-family models."""
    out = tmp_path / "bench.json"
    done = run_cli("scalelora.bench", ["--scenario", scenario, "--smoke", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ratio"] > 0 and report["precision"] == ("bf16" if torch.cuda.is_available() else "no")


@pytest.mark.parametrize(
    ("kind", "low", "high"),
    [
        ("bert", 22e6, 23e6),  # MiniLM-L6
        ("distilbert", 66e6, 67e6),
        ("roberta", 124e6, 125e6),
        ("gpt2", 124e6, 125e6),
        ("qwen2", 494e6, 495e6),  # Qwen2.5-0.5B, tied embeddings
    ],
)
def test_gpu_scenario_models_have_the_real_shapes(kind: str, low: float, high: float) -> None:
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(bench.architecture_config(kind, smoke=False))
    assert low <= sum(p.numel() for p in model.parameters()) <= high


def test_smoke_models_are_tiny() -> None:
    from transformers import AutoModel

    for kind in ("bert", "distilbert", "roberta", "gpt2", "qwen2"):
        with torch.device("meta"):
            model = AutoModel.from_config(bench.architecture_config(kind, smoke=True))
        non_embedding = bench_non_embedding(model)
        assert non_embedding < 100_000, kind


def bench_non_embedding(model: torch.nn.Module) -> int:
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return sum(p.numel() for p in model.parameters()) - embeddings


def test_frozen_flops_params_leave_out_embeddings(tmp_path: Path) -> None:
    folder = bench.build_model_folder("gpt2", tmp_path / "gpt2", smoke=True)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder)
    assert bench.frozen_flops_params(str(folder)) == bench_non_embedding(model)


def test_step_clock_times_only_the_steps_after_warmup(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter([10.0, 13.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    clock = bench.StepClock(warmup=2, steps=3, cuda=False)
    for _ in range(5):
        clock.step_ended()  # reads the clock only after step 2 and after step 5
    counts = [(4, torch.tensor(10), 16)] * 2 + [(4, torch.tensor(12), 16)] * 3
    result = bench.window_result(clock, counts, cuda=False)
    assert result["timed_seconds"] == 3.0 and result["timed_steps"] == 3
    assert result["samples"] == 12 and result["tokens"] == 36 and result["padded_tokens"] == 48
    assert result["samples_per_second"] == 4.0 and result["padding_efficiency"] == 0.75


def fake_run(side: str, samples_per_second: float, step_seconds: float) -> dict:
    return {
        "side": side,
        "samples_per_second": samples_per_second,
        "tokens_per_second": 10 * samples_per_second,
        "step_seconds": step_seconds,
        "peak_memory_bytes": 1,
        "peak_memory_kind": "rss",
        "padding_efficiency": 1.0,
        "validation_accuracy": 0.8,
        "setup_seconds": 1.0,
        "trainable_params": 10,
    }


def test_summary_takes_the_median_of_paired_ratios() -> None:
    scenario = bench.SCENARIOS["cpu-minilm-kd"]
    runs = []
    for hf_speed, ours, plain_step in ((10, 20, 1.0), (10, 30, 1.0), (5, 20, 2.0)):
        runs += [
            fake_run(bench.HF, hf_speed, 1.0),
            fake_run(bench.SCALELORA, ours, plain_step),
            fake_run(bench.KD_CACHE, ours, 1.04 * plain_step),
            fake_run(bench.KD_SELF, ours, 1.5 * plain_step),
        ]
    spec = {"model_path": "minilm-l6", "steps": 3, "warmup": 1}
    report = bench.summarize(scenario, runs, spec, smoke=False)
    assert report["ratio"] == pytest.approx(3.0)  # ratios 2, 3, 4
    assert report["kd_cache_step_ratio"] == pytest.approx(1.04)
    assert report["kd_self_step_ratio"] == pytest.approx(1.5)
    assert report["sides"][bench.HF]["samples_per_second"] == 10
    assert report["accuracy_difference"] == pytest.approx(0.0)
    assert report["repeats"] == 3


def test_overrides_give_scalelora_the_same_work() -> None:
    from scalelora.config import load_config

    spec = {
        "model_path": "minilm-l6",
        "data_path": "rotten_tomatoes",
        "max_length": 128,
        "lora_r": 8,
        "lora_alpha": 16.0,
        "lora_dropout": 0.1,
        "batch_size": 32,
        "precision": "no",
        "lr": 1e-3,
        "warmup": 5,
        "steps": 30,
        "side": bench.KD_CACHE,
        "cache_dir": "/tmp/cache",
        "overrides": ["data.group_by_length=false"],
    }
    cfg = load_config("quickstart", bench.scalelora_overrides(spec, Path("/tmp/out")))
    assert cfg.train.precision == "no" and cfg.train.max_steps == 35 and cfg.data.max_length == 128
    assert cfg.train.weight_decay == 0.0 and cfg.train.warmup_ratio == 0.0  # TrainingArguments defaults
    assert cfg.distill.enabled and cfg.distill.teacher == "cache" and cfg.distill.cache_dir == "/tmp/cache"
    assert cfg.data.group_by_length is False and cfg.data.test_split is None


def test_teacher_cache_is_read_by_cached_teacher(tmp_path: Path, toy_data: Path) -> None:
    from scalelora import data as data_lib
    from scalelora.config import load_config
    from scalelora.teacher import CachedTeacher

    spec = {
        "model_path": "minilm-l6",
        "data_path": str(toy_data),
        "max_length": 32,
        "lora_r": 8,
        "lora_alpha": 16.0,
        "lora_dropout": 0.1,
        "batch_size": 8,
        "precision": "no",
        "lr": 1e-3,
        "warmup": 1,
        "steps": 2,
        "max_train_samples": 40,
        "side": bench.SCALELORA,
    }
    cache = bench.write_teacher_cache(spec, tmp_path / "cache")
    cfg = load_config("quickstart", bench.scalelora_overrides(spec, tmp_path / "out"))
    splits = data_lib.load_splits(cfg.data, cfg.seed)
    teacher = CachedTeacher(cache, splits.fingerprints["train"], splits.label_names, torch.device("cpu"))
    idx = torch.tensor(splits.train["idx"][:4])
    assert teacher(None, {}, idx, False).logits.shape == (4, 2)


def test_gpu_scenario_without_gpu_is_a_one_line_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = run_cli("scalelora.bench", ["--scenario", "gpu-distilbert"])
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("scalelora: error: --scenario gpu-distilbert needs a GPU")
    )


def test_bad_steps_is_a_one_line_error() -> None:
    assert bench.main(["--scenario", "cpu-minilm-rt", "--steps", "0"]) == 2


def test_vectorized_pad_collator_matches_row_by_row_padding() -> None:
    """The loop lever: PadCollator pads with one masked scatter; the result is plain per-row padding."""
    import random

    from scalelora.data import PadCollator

    rng = random.Random(0)
    rows = []
    for i in range(13):
        n = rng.randint(1, 20)
        rows.append(
            {
                "input_ids": [rng.randint(5, 99) for _ in range(n)],
                "attention_mask": [1] * n,
                "token_type_ids": [0] * n,
                "labels": i % 3,
                "idx": 100 + i,
            }
        )
    for multiple in (None, 8):
        batch = PadCollator(pad_token_id=3, pad_to_multiple_of=multiple)(rows)
        longest = max(len(r["input_ids"]) for r in rows)
        if multiple:
            longest = -(-longest // multiple) * multiple
        for key, fill in (("input_ids", 3), ("attention_mask", 0), ("token_type_ids", 0)):
            expected = torch.tensor([r[key] + [fill] * (longest - len(r[key])) for r in rows])
            assert batch[key].dtype == torch.long and torch.equal(batch[key], expected)
        assert batch["labels"].tolist() == [r["labels"] for r in rows]
        assert batch["idx"].tolist() == [r["idx"] for r in rows]


def test_mfu_counts_a_frozen_base_at_four_flops_per_parameter_and_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bench, "device_peak_flops", lambda: ("NVIDIA H100 80GB HBM3", 1e12))
    monkeypatch.setattr(bench, "frozen_flops_params", lambda path: 1000)
    runs = [fake_run(bench.HF, 10.0, 1.0), fake_run(bench.SCALELORA, 20.0, 0.5)]
    report = bench.summarize(
        bench.SCENARIOS["gpu-distilbert"], runs, {"model_path": "x", "steps": 1, "warmup": 1}, False
    )
    # (4 * 1000 frozen + 6 * 10 trainable) FLOPs per token * 200 tokens/s / 1e12 FLOP/s
    assert report["sides"][bench.SCALELORA]["mfu"] == pytest.approx(4060 * 200 / 1e12)
    assert report["sides"][bench.HF]["mfu"] == pytest.approx(4060 * 100 / 1e12)
