"""The benchmark: it runs every side end to end in smoke mode and writes its JSON; its pieces (shapes
of the GPU scenarios' models, the timing window, the comparator and ratios, the FLOP counter, the
teacher cache) are right; the trainer's own timing it reads (summary.json's steady_state and
phase_seconds) and the lazy imports it measures. No timings are asserted: they depend on the machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import bench
from conftest import ROOT, run_cli, tiny_overrides


def test_smoke_runs_every_side_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # one whole epoch of 32 rows (4 steps of 8: 1 warm-up, 3 timed), so every side also reports accuracy
    args = ["--scenario", "cpu-minilm-rt", "--smoke", "--epochs", "1", "--max-train-samples", "32"]
    # LONG_CHUNK: batches of whole documents (samples count documents); head_tail's batches are scalelora's
    sides = [bench.HF, bench.HF_GROUPED, bench.SCALELORA, bench.SCALELORA_NOGROUP, bench.LONG_CHUNK]
    done = run_cli("scalelora.bench", [*args, "--sides", ",".join(sides), "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["scenario"] == "cpu-minilm-rt" and report["smoke"] is True
    assert set(report["sides"]) == set(sides)
    for side in report["sides"].values():
        run = side["repeats"][0]
        assert run["timed_steps"] == 3 and run["warmup_steps"] == 1 and run["optimizer_steps"] == 4
        assert run["samples"] == 3 * 8  # three timed steps of batch 8
        assert 0 < run["tokens"] <= run["padded_tokens"] and run["token_pairs"] >= run["tokens"]
        assert side["samples_per_second"] > 0 and side["peak_memory_bytes"] > 0
        assert side["peak_memory_kind"] == "rss"
        assert 0.0 <= side["validation_accuracy"] <= 1.0
        # useful LoRA FLOP/s against the machine's measured matmul throughput at the model's shapes
        assert side["achieved_gflops"] > 0 and side["mfu_measured_gemm"] > 0
    # every side trains the same weights: LoRA on query/value plus the classifier head
    trainable = {side["repeats"][0]["trainable_params"] for side in report["sides"].values()}
    assert len(trainable) == 1
    # scalelora is measured against the faster HF configuration, and against HF's defaults
    speeds = {name: report["sides"][name]["samples_per_second"] for name in bench.HF_SIDES}
    assert report["comparator"] == max(speeds, key=speeds.get)
    ours = report["sides"][bench.SCALELORA]["samples_per_second"]
    assert report["ratio"] == pytest.approx(ours / speeds[report["comparator"]], rel=1e-9)
    assert report["ratio_default"] == pytest.approx(ours / speeds[bench.HF], rel=1e-9)
    assert report["ratios"][bench.SCALELORA_NOGROUP] > 0
    # peak memory through training, read on both sides as the last timed step ends; scalelora's whole run
    # (final evaluation and report included) is kept beside it
    memories = {name: report["sides"][name]["peak_memory_bytes"] for name in sides}
    assert report["memory_ratio"] == pytest.approx(memories[bench.SCALELORA] / memories[report["comparator"]])
    ours_run = report["sides"][bench.SCALELORA]["repeats"][0]
    assert ours_run["run_peak_memory_bytes"] >= ours_run["peak_memory_bytes"]
    assert report["gemm_gflops"] > 0 and report["gemm"]["dtype"] == "float32"
    assert report["mfu_measured_gemm"] == report["sides"][bench.SCALELORA]["mfu_measured_gemm"]
    assert report["flops_per_step"]["per_token"] > 0
    environment = report["environment"]
    assert environment["date"] and environment["machine"]["cores"] > 0
    assert environment["versions"]["torch"] and len(environment["load_average_start"]) == 3
    assert "ratio:" in done.stdout and "comparator:" in done.stdout


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
    assert report["ratio"] is None and report["comparator"] is None  # no HF side asked for
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


def test_flop_counter_matches_a_hand_count_for_a_tiny_bert(tiny_bert: Path) -> None:
    """2 layers, hidden 32, FFN 64, 2 heads, LoRA r=8 on query/value, a 2-label head; 2 examples of 3 and
    5 real tokens. FLOPs per matmul of m multiply-adds: 2m forward, +2m activation gradient (not for the
    first layer's Q/K/V, whose input needs none), +2m weight gradient (trainable weights only)."""
    from benchmarks.hardware import lora_model_on_meta, step_flops
    from scalelora.config import LoraConfig

    flops = step_flops(lora_model_on_meta(str(tiny_bert), LoraConfig(r=8, alpha=16, dropout=0.1), 2))
    square, ffn, lora = 32 * 32, 32 * 64, 32 * 8  # multiply-adds per token
    first_layer = (
        3 * 2 * square  # Q, K, V: forward only
        + 2 * (2 * 2 * lora + 2 * 3 * lora)  # LoRA A (no input gradient) and B on query and value
        + 4 * square  # attention output projection: forward + activation gradient
        + 2 * 4 * ffn  # MLP up and down
    )
    other_layer = 3 * 4 * square + 2 * (2 * 3 * lora + 2 * 3 * lora) + 4 * square + 2 * 4 * ffn
    assert flops.per_token == first_layer + other_layer == 70656
    # attention, 32 wide: forward 2 * 2 * 32 per (query, key) pair; backward twice that, except that the
    # first layer needs no key gradient (key is frozen and its input needs none)
    assert flops.per_pair == (2 * 32 * (2 + 1 + 0 + 1 + 1)) + (2 * 32 * 6) == 704
    # once per example: the pooler (frozen, 32x32) and the classifier (trained, 32x2)
    assert flops.per_example == 4 * square + 6 * 32 * 2 == 4480
    assert not flops.causal
    tokens, pairs = 3 + 5, 3 * 3 + 5 * 5
    assert flops(tokens, pairs, 2) == 8 * 70656 + 34 * 704 + 2 * 4480


def test_flop_counter_covers_the_gpu_scenario_families(tmp_path: Path) -> None:
    from benchmarks.hardware import lora_model_on_meta, step_flops
    from scalelora.config import LoraConfig

    for kind in ("distilbert", "roberta", "gpt2", "qwen2"):
        folder = bench.build_model_folder(kind, tmp_path / kind, smoke=True)
        flops = step_flops(lora_model_on_meta(str(folder), LoraConfig(r=8, alpha=16, dropout=0.1), 2))
        assert flops.per_token > 0 and flops.per_pair > 0 and flops.per_example > 0, kind
        assert flops.causal == (kind in ("gpt2", "qwen2")), kind
        # one example of 4 tokens: a causal model attends to (4^2 + 4) / 2 = 10 pairs, an encoder to 16
        pairs = 10 if flops.causal else 16
        expected = 4 * flops.per_token + pairs * flops.per_pair + flops.per_example
        assert flops(4, 16, 1) == pytest.approx(expected), kind


def test_gemm_measurement_reports_each_shape_and_the_layer_mix() -> None:
    from benchmarks.hardware import measure_gemm

    result = measure_gemm(tokens=16, hidden=32, ffn=64, seconds_per_shape=0.01)
    assert set(result["shapes"]) == {"hidden_x_hidden", "hidden_x_ffn", "ffn_x_hidden", "hidden_x_3hidden"}
    assert result["shapes"]["hidden_x_ffn"] == {
        "m": 16,
        "k": 32,
        "n": 64,
        "gflops": pytest.approx(result["shapes"]["hidden_x_ffn"]["gflops"]),
    }
    rates = [shape["gflops"] for name, shape in result["shapes"].items() if name != "hidden_x_3hidden"]
    # the layer mix is a time-weighted mean, so it lies between the slowest and the fastest shape
    assert min(rates) <= result["gemm_flops"] / 1e9 <= max(rates)
    assert result["dtype"] == ("bfloat16" if torch.cuda.is_available() else "float32")


def test_step_clock_times_only_the_steps_after_warmup(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = iter([10.0, 13.0])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    clock = bench.StepClock(warmup=2, steps=3, cuda=False)
    for _ in range(5):
        clock.step_ended()  # reads the clock only after step 2 and after step 5
    counts = [(4, torch.tensor(10), 16, torch.tensor(30))] * 2 + [
        (4, torch.tensor(12), 16, torch.tensor(40))
    ] * 3
    result = bench.window_result(clock, counts, cuda=False)
    assert result["timed_seconds"] == 3.0 and result["timed_steps"] == 3
    assert result["samples"] == 12 and result["tokens"] == 36 and result["padded_tokens"] == 48
    assert result["token_pairs"] == 120
    assert result["samples_per_second"] == 4.0 and result["padding_efficiency"] == 0.75


def test_batch_counts_sum_real_lengths_and_their_squares() -> None:
    batch = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
    }
    samples, tokens, padded, pairs = bench.batch_counts([batch, batch])
    assert (samples, int(tokens), padded, int(pairs)) == (4, 10, 16, 2 * (9 + 4))


def test_hf_grouped_side_asks_for_length_grouped_sampling(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    grouped = TrainingArguments(output_dir=str(tmp_path), **bench.hf_sampling_arguments(True))
    default = TrainingArguments(output_dir=str(tmp_path), **bench.hf_sampling_arguments(False))
    assert grouped.train_sampling_strategy == "group_by_length"
    assert default.train_sampling_strategy == "random"


def fake_run(side: str, samples_per_second: float, step_seconds: float) -> dict:
    return {
        "side": side,
        "samples_per_second": samples_per_second,
        "tokens_per_second": 10 * samples_per_second,
        "step_seconds": step_seconds,
        "timed_seconds": 2.0,
        "samples": 2 * samples_per_second,
        "tokens": 20 * samples_per_second,
        "token_pairs": 200 * samples_per_second,
        "peak_memory_bytes": 1,
        "peak_memory_kind": "rss",
        "padding_efficiency": 1.0,
        "validation_accuracy": 0.8,
        "setup_seconds": 1.0,
        "trainable_params": 10,
    }


def test_summary_takes_the_median_of_paired_ratios_against_the_faster_hf_configuration() -> None:
    scenario = bench.SCENARIOS["cpu-minilm-kd"]
    runs = []
    for hf_speed, grouped_speed, ours, plain_step in ((10, 16, 20, 1.0), (10, 15, 30, 1.0), (5, 10, 20, 2.0)):
        runs += [
            fake_run(bench.HF, hf_speed, 1.0),
            fake_run(bench.HF_GROUPED, grouped_speed, 1.0),
            fake_run(bench.SCALELORA, ours, plain_step),
            fake_run(bench.KD_CACHE, ours, 1.04 * plain_step),
            fake_run(bench.KD_SELF, ours, 1.5 * plain_step),
        ]
    ours_memory = iter((3, 2, 5))
    for run in runs:
        if run["side"] in (bench.SCALELORA, bench.HF_GROUPED):
            run["peak_memory_bytes"] = next(ours_memory) if run["side"] == bench.SCALELORA else 4
    spec = {"model_path": "minilm-l6", "steps": 3, "warmup": 1}
    report = bench.summarize(scenario, runs, spec, smoke=False)
    assert report["comparator"] == bench.HF_GROUPED  # median 15 samples/s against 10
    assert report["memory_ratio"] == pytest.approx(3 / 4)  # paired: median of 3/4, 2/4, 5/4
    assert report["ratio"] == pytest.approx(2.0)  # ratios 20/16, 30/15, 20/10
    assert report["ratio_default"] == pytest.approx(3.0)  # ratios 2, 3, 4
    assert report["ratios"][bench.HF] == pytest.approx(10 / 16)  # median of 10/16, 10/15, 5/10
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
    assert cfg.train.timing_skip_steps == 5  # the trainer's steady-state clock skips the warm-up
    assert cfg.train.weight_decay == 0.0 and cfg.train.warmup_ratio == 0.0  # TrainingArguments defaults
    assert cfg.distill.enabled and cfg.distill.teacher == "cache" and cfg.distill.cache_dir == "/tmp/cache"
    assert cfg.data.group_by_length is False and cfg.data.test_split is None
    plain = load_config(
        "quickstart",
        bench.scalelora_overrides({**spec, "side": bench.SCALELORA, "overrides": []}, Path("/tmp/o")),
    )
    nogroup = load_config(
        "quickstart",
        bench.scalelora_overrides({**spec, "side": bench.SCALELORA_NOGROUP, "overrides": []}, Path("/tmp/o")),
    )
    assert plain.data.group_by_length is True and nogroup.data.group_by_length is False
    torch_dropout = load_config(
        "quickstart",
        bench.scalelora_overrides(
            {**spec, "side": bench.SCALELORA_TORCH_DROPOUT, "overrides": []}, Path("/tmp/o")
        ),
    )
    assert plain.train.mask_dropout is True and torch_dropout.train.mask_dropout is False
    assert nogroup.train.mask_dropout is True and torch_dropout.data.group_by_length is True
    assert not plain.distill.enabled and not nogroup.distill.enabled
    compiled = load_config(
        "quickstart",
        bench.scalelora_overrides({**spec, "side": bench.SCALELORA, "compile": True}, Path("/tmp/o")),
    )
    assert compiled.train.compile is True
    # the long-text sides: head_tail within max_length; windows of half of it, overlapping by a quarter
    head_tail, chunk = (
        load_config(
            "quickstart", bench.scalelora_overrides({**spec, "side": side, "overrides": []}, Path("/tmp/o"))
        )
        for side in (bench.LONG_HEAD_TAIL, bench.LONG_CHUNK)
    )
    assert head_tail.data.long_text == "head_tail" and head_tail.data.max_length == 128
    assert chunk.data.long_text == "chunk" and chunk.data.max_length == 64 and chunk.data.chunk_stride is None
    assert plain.data.long_text == "truncate" and chunk.train.batch_size == plain.train.batch_size
    scenario = bench.SCENARIOS["cpu-minilm-imdb-long"]
    assert bench.scenario_spec(scenario, 20, 3, None)["data_path"] == "imdb" and scenario.max_length == 512


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


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989),  # SXM5
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA H200", 989),
        ("NVIDIA H200 NVL", 835),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA L40S", 362),
        ("NVIDIA L40", 181),
        ("NVIDIA L4", 121),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_the_gpu_peak_is_looked_up_by_the_full_device_name(name: str, tflops: int | None) -> None:
    """The H100's and H200's form factors differ in clocks and power, so in dense bf16 peak: one peak for
    every H100 overstated a PCIe card's by 31% (and understated its MFU)."""
    peak = bench.peak_bf16_flops(name)
    assert (None if peak is None else round(peak / 1e12)) == tflops


def test_achieved_flops_against_measured_gemm_and_the_device_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.hardware import StepFlops

    monkeypatch.setattr(bench, "device_peak_flops", lambda: ("NVIDIA H100 80GB HBM3", 1e12))
    flops = StepFlops(per_token=1000.0, per_pair=10.0, per_example=100.0, causal=False)
    runs = [fake_run(bench.HF, 10.0, 1.0), fake_run(bench.SCALELORA, 20.0, 0.5)]
    gemm = {"gemm_flops": 2e9}
    report = bench.summarize(
        bench.SCENARIOS["gpu-distilbert"],
        runs,
        {"model_path": "x", "steps": 1, "warmup": 1},
        False,
        flops,
        gemm,
    )
    # scalelora's run: 400 tokens, 4000 pairs, 40 examples in 2 s
    achieved = (1000 * 400 + 10 * 4000 + 100 * 40) / 2.0
    ours = report["sides"][bench.SCALELORA]
    assert ours["achieved_gflops"] == pytest.approx(achieved / 1e9)
    assert ours["mfu_measured_gemm"] == pytest.approx(achieved / 2e9)
    assert ours["mfu"] == pytest.approx(achieved / 1e12)
    assert report["mfu_measured_gemm"] == ours["mfu_measured_gemm"] and report["gemm_gflops"] == 2.0
    assert report["sides"][bench.HF]["achieved_gflops"] == pytest.approx(achieved / 2 / 1e9)


def test_time_to_result_report_has_both_sides_and_phases(tmp_path: Path) -> None:
    run = {
        "wall_seconds": 10.0,
        "phase_seconds": dict.fromkeys(bench.PHASES, 1.0),
        "other_seconds": 4.0,
        "peak_rss_bytes": 1,
        "validation_accuracy": 0.8,
        "test_accuracy": 0.8,
        "optimizer_steps": 2,
    }
    text = bench.format_time_to_result(
        {
            "device": "cpu",
            "smoke": True,
            "ratio": 1.5,
            "sides": {bench.TTR_SCALELORA: run, bench.TTR_HF: {**run, "wall_seconds": 15.0}},
        }
    )
    assert "ratio (HF script wall / scalelora wall): 1.500" in text


@pytest.mark.slow
def test_smoke_time_to_result_runs_both_whole_runs(tmp_path: Path) -> None:
    out = tmp_path / "ttr.json"
    done = run_cli("scalelora.bench", ["--time-to-result", "--smoke", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["sides"]) == {bench.TTR_SCALELORA, bench.TTR_HF} and report["ratio"] > 0
    for side in report["sides"].values():
        run = side["repeats"][0]
        assert set(run["phase_seconds"]) == set(bench.PHASES)
        assert run["wall_seconds"] >= sum(run["phase_seconds"].values()) > 0
        assert run["optimizer_steps"] == 2  # 64 rows, the quickstart's batch of 32, 1 epoch
        assert 0 <= run["validation_accuracy"] <= 1 and 0 <= run["test_accuracy"] <= 1


@pytest.mark.slow
def test_smoke_precision_pairs_runs_fp32_bf16_and_hf_bf16(tmp_path: Path) -> None:
    out = tmp_path / "precision.json"
    done = run_cli("scalelora.bench", ["--precision-pairs", "--smoke", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "precision_pairs" and report["smoke"] is True
    assert set(report["sides"]) == set(bench.PRECISION_SIDES)
    for side, entry in report["sides"].items():
        (run,) = entry["repeats"]
        assert run["precision"] == ("no" if side == bench.PRECISION_FP32 else "bf16")
        assert run["optimizer_steps"] == 4  # 128 rows, batch 32, 1 epoch: 2 skipped, 2 timed
        assert run["steady_samples_per_second"] > 0 and 0 <= run["test_accuracy"] <= 1
    assert report["bf16_over_fp32"] > 0 and isinstance(report["bf16_pays"], bool)
    assert set(report["cpu_bf16"]["features"]) == {"amx_bf16", "avx512_bf16"}
    assert "bf16 / fp32 samples/s" in done.stdout


def test_precision_pairs_interleaves_the_pair_and_applies_the_rule(monkeypatch, tmp_path: Path) -> None:
    """bf16 pays when its paired speed-up reaches runtime.CPU_BF16_MIN_SPEEDUP at a test accuracy at most
    CPU_BF16_MAX_ACCURACY_DROP lower; each repeat's ratio is of the two runs made back to back."""
    order: list[str] = []

    def fake(speed: dict[str, list[float]], test: dict[str, float]):
        def run(side, args, workdir, index, model, kind, extra, env_extra):
            assert env_extra == {"CUDA_VISIBLE_DEVICES": ""}  # a CPU measurement even on a GPU host
            repeat = sum(1 for s in order if s == side)
            order.append(side)
            return {
                "side": side,
                "steady_samples_per_second": speed[side][repeat],
                "wall_seconds": 1.0,
                "phase_seconds": {"train": 1.0},
                "validation_accuracy": test[side],
                "test_accuracy": test[side],
                "peak_rss_bytes": 1,
            }

        return run

    args = bench.parse_args(["--precision-pairs", "--repeats", "2"])
    speed = {
        bench.PRECISION_FP32: [100.0, 50.0],
        bench.PRECISION_BF16: [120.0, 60.0],
        bench.PRECISION_HF_BF16: [60.0, 30.0],
    }
    equal = dict.fromkeys(bench.PRECISION_SIDES, 0.8)
    monkeypatch.setattr(bench, "time_to_result_run", fake(speed, equal))
    report = bench.precision_pairs(args, tmp_path)
    assert order == [
        bench.PRECISION_FP32,
        bench.PRECISION_BF16,
        bench.PRECISION_HF_BF16,
        bench.PRECISION_HF_BF16,
        bench.PRECISION_BF16,
        bench.PRECISION_FP32,
    ]
    assert report["bf16_over_fp32_repeats"] == pytest.approx([1.2, 1.2]) and report["bf16_pays"] is True
    assert report["bf16_over_hf_bf16"] == pytest.approx(2.0)
    order.clear()
    lower = {**equal, bench.PRECISION_BF16: 0.79}  # 1 point below fp32
    monkeypatch.setattr(bench, "time_to_result_run", fake(speed, lower))
    assert bench.precision_pairs(args, tmp_path)["bf16_pays"] is False
    order.clear()
    slow = {**speed, bench.PRECISION_BF16: [105.0, 52.0]}  # 1.05x
    monkeypatch.setattr(bench, "time_to_result_run", fake(slow, equal))
    assert bench.precision_pairs(args, tmp_path)["bf16_pays"] is False


def test_every_cpu_bf16_decision_rests_on_a_committed_measurement() -> None:
    """runtime.CPU_BF16_MEASURED: each entry cites a committed, non-smoke --precision-pairs JSON made on a
    CPU whose most capable bf16 feature is the entry's, and says what that JSON found."""
    from scalelora.runtime import CPU_BF16_FEATURES, CPU_BF16_MEASURED

    for feature, (pays, source) in CPU_BF16_MEASURED.items():
        assert feature in CPU_BF16_FEATURES
        path = ROOT / source
        assert path.is_file() and path.parent == ROOT / "benchmarks" / "results", source
        report = json.loads(path.read_text())
        assert report["mode"] == "precision_pairs" and report["smoke"] is False, source
        assert report["cpu_bf16"]["feature"] == feature, source
        assert report["bf16_pays"] is pays, source


# --- the trainer's own timing: what the benchmark reads -------------------------------------------


def test_summary_reports_steady_state_after_the_skipped_steps_and_phase_seconds(
    tiny_bert: Path, toy_data: Path, tmp_path: Path
) -> None:
    from scalelora.config import load_config
    from scalelora.trainer import run_training

    out = tmp_path / "run"
    # 6 steps of 8, 2 skipped; evaluation and a checkpoint inside the loop are paused out of the clock
    overrides = tiny_overrides(
        tiny_bert,
        toy_data,
        out,
        **{"train.timing_skip_steps": 2, "checkpoint.every": 2, "train.compile": "auto"},
    )
    summary = run_training(load_config("quickstart", overrides))
    on_disk = json.loads((out / "summary.json").read_text())
    steady = on_disk["steady_state"]
    assert steady == summary["steady_state"]
    assert steady["skipped_steps"] == 2 and steady["steps"] == 4 and steady["samples"] == 4 * 8
    assert 0 < steady["tokens"] <= steady["padded_tokens"]
    # every real token attends to every real token of its example: sum of length^2 >= sum of length
    assert steady["token_pairs"] >= steady["tokens"]
    assert steady["samples_per_second"] == pytest.approx(steady["samples"] / steady["seconds"])
    assert steady["tokens_per_second"] == pytest.approx(steady["tokens"] / steady["seconds"])
    assert steady["step_seconds"] == pytest.approx(steady["seconds"] / 4)
    assert steady["padding_efficiency"] == pytest.approx(steady["tokens"] / steady["padded_tokens"])
    # peak memory as the last counted step ended: before the final evaluation and report, so at most
    # the whole run's peak (host RSS only grows); no CUDA figure on CPU
    assert steady["peak_memory_bytes"]["gpu"] is None
    assert 0 < steady["peak_memory_bytes"]["host"] <= on_disk["peak_memory_gb"]["host"] * 2**30
    phases = on_disk["phase_seconds"]
    assert set(phases) == {"startup", "data", "model", "train", "eval", "save"}
    assert all(value is None or value >= 0 for value in phases.values())
    assert phases["train"] > 0 and phases["eval"] > 0 and phases["save"] > 0 and phases["data"] > 0
    # the steady window is inside the loop, and the loop's evaluations and saves are not in `train`
    assert steady["seconds"] <= phases["train"]
    assert on_disk["compiled"] is False  # train.compile=auto stays eager on CPU
    assert "samples_per_second" in on_disk and "train_seconds" in on_disk  # the old keys stay


def test_steady_state_is_null_when_every_step_is_skipped(
    tiny_bert: Path, toy_data: Path, tmp_path: Path
) -> None:
    from scalelora.config import load_config
    from scalelora.trainer import run_training

    overrides = tiny_overrides(
        tiny_bert, toy_data, tmp_path / "run", **{"train.max_steps": 2, "train.timing_skip_steps": 2}
    )
    assert run_training(load_config("quickstart", overrides))["steady_state"] is None


def test_negative_timing_skip_steps_is_a_one_line_error() -> None:
    done = run_cli("scalelora.train", ["--config", "quickstart", "train.timing_skip_steps=-1"])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "scalelora: error: train.timing_skip_steps must be >= 0, got -1"
    ]


def test_compile_auto_is_on_for_cuda_only() -> None:
    from scalelora.config import load_config
    from scalelora.runtime import compile_enabled

    assert load_config("quickstart", ["train.compile=auto"]).train.compile == "auto"
    assert compile_enabled("auto", torch.device("cpu")) is False
    assert compile_enabled("auto", torch.device("cuda", 0)) is True
    assert compile_enabled(True, torch.device("cpu")) is True
    assert compile_enabled(False, torch.device("cuda", 0)) is False


def test_train_compile_decides_whether_prepare_compiles_and_the_launch_with_what(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Accelerate compiles the model in `prepare` (around DDP, and DeepSpeed's module in place), never
    scalelora before it; the launch config's dynamo backend names the backend but does not turn it on."""
    from accelerate.utils import DynamoBackend

    from scalelora.config import load_config
    from scalelora.runtime import build_accelerator, compiles, dynamo_plugin, reset_accelerate_state

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    assert dynamo_plugin(True, cpu).backend == DynamoBackend.INDUCTOR
    assert dynamo_plugin("auto", cuda).backend == DynamoBackend.INDUCTOR
    assert dynamo_plugin("auto", cpu).backend == dynamo_plugin(False, cuda).backend == DynamoBackend.NO
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # what `accelerate launch` sets by default
    assert dynamo_plugin(True, cpu).backend == DynamoBackend.INDUCTOR
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")
    assert dynamo_plugin(True, cpu).backend == DynamoBackend.EAGER
    assert dynamo_plugin(False, cpu).backend == DynamoBackend.NO
    for setting, compiled in (("true", True), ("false", False)):
        reset_accelerate_state()
        accelerator = build_accelerator(
            load_config("quickstart", [f"output_dir={tmp_path}", f"train.compile={setting}"])
        )
        assert compiles(accelerator) is compiled
        warned = (
            "the launch config's dynamo_backend=eager is not used: train.compile=false"
            in capsys.readouterr().err
        )
        assert warned is not compiled
    reset_accelerate_state()


def test_throughput_clock_leaves_out_warmup_and_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    from scalelora.meters import StepCounter, ThroughputClock

    now = {"t": 0.0}
    monkeypatch.setattr(time_module(), "perf_counter", lambda: now["t"])
    clock = ThroughputClock(skip=1, device=torch.device("cpu"))

    def step(seconds: float, lengths: list[int], last: bool = False) -> None:
        now["t"] += seconds
        mask = torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])
        counter = StepCounter(torch.device("cpu"))  # the trainer's count of a step's micro-batches
        for row in range(len(lengths)):  # one micro-batch per example
            counter.add(torch.zeros(1), {"attention_mask": mask[row : row + 1]})
        clock.step_ended(counter.stats(torch.tensor(0.0), None, seconds, ranks=1), last)

    step(5.0, [3, 1])  # warm-up: not counted
    step(1.0, [2, 2])
    with clock.paused():  # an evaluation between steps
        now["t"] += 7.0
    step(2.0, [4, 1], last=True)
    with clock.paused():  # the final evaluation: after the window
        now["t"] += 9.0
    result = clock.read()
    assert result["steps"] == 2 and result["seconds"] == pytest.approx(3.0)
    assert result["samples"] == 4 and result["tokens"] == 9 and result["padded_tokens"] == 12
    assert result["token_pairs"] == 4 + 4 + 16 + 1
    assert result["samples_per_second"] == pytest.approx(4 / 3)
    # every rank holds a batch of the same shape: the counts of one rank scale to all of them
    counter = StepCounter(torch.device("cpu"))
    counter.add(torch.zeros(2), {"attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])})
    stats = counter.stats(torch.tensor(0.0), None, 1.0, ranks=2)
    assert (stats.samples, int(stats.tokens), stats.padded_tokens, int(stats.token_pairs)) == (4, 10, 12, 26)


def time_module():
    import scalelora.meters

    return scalelora.meters.time


def test_phase_timer_counts_a_nested_phase_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from scalelora.meters import PhaseTimer

    now = {"t": 0.0}
    monkeypatch.setattr(time_module(), "perf_counter", lambda: now["t"])
    phases = PhaseTimer()
    with phases("train"):
        now["t"] += 10
        with phases("eval"):
            now["t"] += 3
            with phases("save"):
                now["t"] += 1
    assert phases.seconds == {"train": 10.0, "eval": 3.0, "save": 1.0}


# --- lazy imports: a plain CPU run neither imports DeepSpeed nor bitsandbytes, nor warns ------------

PLAIN_RUN = """
import json, sys
from scalelora.train import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "loaded": sorted(m for m in ("deepspeed", "bitsandbytes") if m in sys.modules)}))
"""


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_plain_cpu_run_imports_neither_deepspeed_nor_bitsandbytes(
    tiny_bert: Path, toy_data: Path, tmp_path: Path, mode: str
) -> None:
    """LoRA and full fine-tuning (a full model saves through transformers' `save_pretrained`, which unwraps
    through accelerate, which imports DeepSpeed when installed; its scheduler import pulls in PEFT)."""
    import os
    import subprocess
    import sys

    args = [
        "--config",
        "quickstart",
        *tiny_overrides(tiny_bert, toy_data, tmp_path / "run", **{"checkpoint.every": 3, "model.mode": mode}),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_RUN, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "loaded": []}
    for noise in ("Setting accelerator to CPU", "FutureWarning", "gemm_4bit_forward", "real_accelerator"):
        assert noise not in done.stderr, done.stderr[-3000:]
    saved = "adapter/adapter_model.safetensors" if mode == "lora" else "model/model.safetensors"
    assert (tmp_path / "run" / saved).is_file()


def test_the_trainer_imports_scikit_learn_only_when_it_first_evaluates() -> None:
    """scikit-learn (about 37 MiB of resident memory, most of a second to import) is loaded by the first
    evaluation, so it is not part of a training step's memory or of start-up."""
    import subprocess
    import sys

    code = (
        "import sys, json, numpy as np, scalelora.trainer\n"
        "from scalelora.evaluation import classification_metrics\n"
        "before = 'sklearn' in sys.modules\n"
        "metrics = classification_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), ['a', 'b'])\n"
        "print(json.dumps([before, 'sklearn' in sys.modules, metrics['accuracy']]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    before, after, accuracy = json.loads(done.stdout.strip().splitlines()[-1])
    assert before is False and after is True
    assert accuracy == pytest.approx(2 / 3)


def test_hidden_bitsandbytes_is_importable_again_afterwards() -> None:
    """An 8/4-bit model later in the same process still finds bitsandbytes (PEFT's cached answer is reset)."""
    import importlib.util
    import sys

    from scalelora.models import bitsandbytes_hidden

    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    import peft.import_utils

    assert peft.import_utils.is_bnb_available() is True  # an answer cached before the block
    saved = sys.modules.pop("bitsandbytes", None)
    try:
        with bitsandbytes_hidden():
            with pytest.raises(ImportError):
                import bitsandbytes  # noqa: F401
            assert peft.import_utils.is_bnb_available() is False
        assert peft.import_utils.is_bnb_available() is True
        assert "bitsandbytes" not in sys.modules or sys.modules["bitsandbytes"] is not None
    finally:
        if saved is not None:
            sys.modules["bitsandbytes"] = saved


HIDE_DEEPSPEED = """
import json, sys
from accelerate.utils import is_deepspeed_available
from scalelora.runtime import deepspeed_hidden
seen = []
with deepspeed_hidden():
    try:
        import deepspeed
        seen.append("imported")
    except ImportError:
        seen.append("hidden")
    seen.append(bool(is_deepspeed_available()))
seen += ["deepspeed" in sys.modules, bool(is_deepspeed_available())]
print(json.dumps(seen))
"""


def test_hidden_deepspeed_is_importable_again_afterwards() -> None:
    """The same `hidden_package` hides DeepSpeed around a full model's save; afterwards Accelerate sees it
    again (a fresh process: the test session itself has DeepSpeed imported already)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    done = subprocess.run([sys.executable, "-c", HIDE_DEEPSPEED], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["hidden", False, False, True]


def test_unwrap_model_removes_compile_and_ddp_like_wrappers() -> None:
    from scalelora.runtime import unwrap_model

    inner = torch.nn.Linear(2, 2)

    class DeepSpeedEngine(torch.nn.Module):  # recognised by name: DeepSpeed is never imported for it
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    compiled = torch.compile(inner)
    assert unwrap_model(DeepSpeedEngine(compiled)) is inner
    assert unwrap_model(DeepSpeedEngine(compiled), keep_compiled=True) is compiled
    assert list(unwrap_model(compiled).state_dict()) == ["weight", "bias"]  # no `_orig_mod.` prefix
    # Accelerate compiles around DDP: the model alone has no compiled wrapper to keep
    around = torch.compile(DeepSpeedEngine(inner))
    assert unwrap_model(around) is inner and unwrap_model(around, keep_compiled=True) is inner


def test_plot_draws_the_figure_and_prints_the_table_from_the_json(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from benchmarks import plot

    runs = [
        fake_run(bench.HF, 10.0, 1.0),
        fake_run(bench.HF_GROUPED, 20.0, 1.0),
        fake_run(bench.SCALELORA, 25.0, 1.0),
    ]
    report = bench.summarize(
        bench.SCENARIOS["cpu-minilm-rt"], runs, {"model_path": "minilm-l6", "steps": 1, "warmup": 1}, False
    )
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert plot.main([str(path), "--png", str(tmp_path / "bars.png"), "--table"]) == 0
    assert (tmp_path / "bars.png").read_bytes()[:4] == b"\x89PNG"
    rows = capsys.readouterr().out
    assert "| `scalelora` | 25.0 (25.0) |" in rows and "1 (comparator)" in rows and "1.250" in rows


@pytest.mark.slow
def test_a_compiled_run_saves_a_loadable_adapter(tiny_bert: Path, toy_data: Path, tmp_path: Path) -> None:
    """train.compile=true: the adapter is saved from inside torch.compile's wrapper without its `_orig_mod.`
    prefix (Accelerate's unwrap keeps the wrapper, and PEFT's save then failed with a KeyError)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from scalelora.config import load_config
    from scalelora.trainer import run_training

    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_bert, toy_data, out, **{"train.max_steps": 2, "train.compile": "true"})
    assert run_training(load_config("quickstart", overrides))["compiled"] is True
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = PeftModel.from_pretrained(base, out / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())


@pytest.mark.slow
def test_decoder_pilot_trains_both_bases_and_counts_their_agreement(
    tiny_llama, toy_data, tmp_path: Path
) -> None:
    """benchmarks/decoder_pilot.py on a tiny Llama: a float32 and a 4-bit side, each run predicting the
    validation split through `scalelora.predict`; the agreement is counted from those predictions, and
    `--reuse` takes finished runs without training them again."""
    out, runs = tmp_path / "pilot.json", tmp_path / "runs"
    args = ["benchmarks/decoder_pilot.py", "--steps", "2", "--runs-dir", str(runs), "--out", str(out)]
    overrides = [
        f"model.name={tiny_llama}",
        f"data.path={toy_data}",
        "data.max_length=32",
        "train.batch_size=8",
    ]
    done = run_cli("benchmarks.decoder_pilot", args[1:] + overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["date"] and report["machine"]["cores"] and report["versions"]["torch"]
    assert set(report["sides"]) == {"d1_float32_base", "d2_4bit_base"}
    for side in report["sides"].values():
        assert side["global_step"] == 2 and side["samples_per_second"] > 0
        assert 0 <= side["validation"]["accuracy"] <= 1
    labels = {
        side: [
            json.loads(line)["label"] for line in (runs / f"{side}-validation.jsonl").read_text().splitlines()
        ]
        for side in report["sides"]
    }
    same = sum(a == b for a, b in zip(*labels.values()))
    assert report["agreement"] == {"validation_texts": 40, "same_label": same, "share": round(same / 40, 4)}
    assert "load_in_4bit: true" in (runs / "d2_4bit_base" / "config.yaml").read_text()
    again = run_cli("benchmarks.decoder_pilot", [*args[1:], "--reuse", *overrides])
    assert again.returncode == 0 and "training" not in again.stderr, again.stderr[-3000:]
