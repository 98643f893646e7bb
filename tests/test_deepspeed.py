"""DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 + offload for real: 2 CPU processes (gloo) through
`accelerate launch`, the tiny model trained, its adapter saved from the gathered state, checked,
reloaded to the same probabilities, and resumed to the same adapter as an uninterrupted run.

Every run has one evaluation, at its last step, so the best adapter is the final one: each run also
goes through `restore_best` (loading the adapter back into a sharded model) before its final
predictions, and resumed and uninterrupted runs are comparable weight for weight.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import (
    ROOT,
    free_port,
    read_summary,
    run_cli,
    save_tiny_classifier,
    save_tiny_model,
    tiny_overrides,
)
from fault_inject import UNSAFE_LOAD
from scalelora.checkpoint import check_adapter_weights
from scalelora.errors import CheckpointError

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'scalelora[deepspeed]')")

pytestmark = pytest.mark.slow

# (shipped accelerate config, ZeRO stage, optimizer offload device)
CONFIGS = {
    "zero2": ("deepspeed_zero2.yaml", 2, "none"),
    "zero3": ("deepspeed_zero3.yaml", 3, "none"),
    "zero3_offload": ("deepspeed_zero3_offload.yaml", 3, "cpu"),
}
RUN = {
    "train.max_steps": 4,
    "eval.every": 4,
    "checkpoint.every": 2,
    "checkpoint.keep_last": 3,
    "train.max_grad_norm": 0.5,
    "lora.dropout": 0.0,
}


def sharded_variant(name: str, folder: Path) -> Path:
    """The shipped config with ZeRO-3's persistence threshold at 0, so even LoRA tensors this small are
    partitioned (with "auto" they stay whole on every rank, and a rank-local save would look fine)."""
    accel = yaml.safe_load((ROOT / "accel_configs" / CONFIGS[name][0]).read_text())
    ds = json.loads((ROOT / accel["deepspeed_config"]["deepspeed_config_file"]).read_text())
    if ds["zero_optimization"]["stage"] == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (folder / f"{name}.json").write_text(json.dumps(ds))
    accel["deepspeed_config"]["deepspeed_config_file"] = str(folder / f"{name}.json")
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(accel))
    return path


def launcher(config: Path, dynamo_backend: str | None = None) -> list[str]:
    # no --cpu: it would silently switch DeepSpeed off; the trainer picks gloo itself without CUDA
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        *(["--dynamo_backend", dynamo_backend] if dynamo_backend else []),
    ]


@pytest.fixture(scope="module")
def ds_env():
    """Compiled DeepSpeed ops are cached across runs; shared-memory buffers this module leaves are removed."""
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_*")) if shm.is_dir() else set()
    cache = os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    yield {"TORCH_EXTENSIONS_DIR": cache}
    for leftover in set(shm.glob("deepspeed_*")) - before if shm.is_dir() else ():
        leftover.unlink(missing_ok=True)


def interrupted_copy(full: Path, target: Path) -> Path:
    """A copy of a finished 4-step run as if it had been stopped after its step-2 checkpoint."""
    shutil.copytree(full, target)
    for later in ("checkpoints/step-4", "adapter", "summary.json"):
        shutil.rmtree(target / later) if (target / later).is_dir() else (target / later).unlink()
    return target


@pytest.fixture(scope="module")
def runs(tiny_bert, toy_data, tmp_path_factory, ds_env):
    """Per config: an uninterrupted 4-step run, and a copy of it resumed from its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("deepspeed")
    out = {}
    for name in CONFIGS:
        config = sharded_variant(name, root)
        full = root / name
        result = run_cli(
            "scalelora.train",
            ["--config", "quickstart", *tiny_overrides(tiny_bert, toy_data, full, **RUN)],
            env=ds_env,
            launcher=launcher(config),
        )
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
        resumed = interrupted_copy(full, root / f"{name}-resumed")
        # every rank refuses a torch.load that could run code (weights_only=False), wherever it is called
        again = subprocess.run(
            [
                *launcher(config),
                str(ROOT / "tests" / "fault_inject.py"),
                "--forbid-unsafe-load",
                "--",
                "--config",
                "quickstart",
                *tiny_overrides(tiny_bert, toy_data, resumed, **RUN),
                "resume=auto",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **ds_env},
            cwd=ROOT,
            timeout=600,
        )
        assert again.returncode == 0, f"{name} resumed: {again.stderr[-3000:]}"
        out[name] = {"full": full, "resumed": resumed, "resume_log": again.stderr, "config": config}
    ddp = root / "ddp"
    result = run_cli(
        "scalelora.train",
        ["--config", "quickstart", *tiny_overrides(tiny_bert, toy_data, ddp, **RUN)],
        launcher=launcher(ROOT / "accel_configs" / "cpu_2proc.yaml"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out["ddp"] = {"full": ddp}
    return out


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("name", CONFIGS)
def test_run_is_deepspeed_with_the_recipe_values(runs, name):
    summary = read_summary(runs[name]["full"])
    _, stage, offload = CONFIGS[name]
    assert summary["distributed_type"] == "DistributedType.DEEPSPEED"
    assert summary["world_size"] == 2
    assert summary["global_step"] == 4
    assert summary["deepspeed"] == {
        "zero_stage": stage,
        "offload_optimizer": offload,
        "offload_param": offload,
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.5,
        "bf16": False,
        "fp16": False,
    }


@pytest.mark.parametrize("name", CONFIGS)
def test_adapter_is_gathered_complete_and_trained(runs, name):
    folder = runs[name]["full"] / "adapter"
    assert check_adapter_weights(folder, r=8) > 0
    tensors = adapter(runs[name]["full"])
    # the classification head (modules_to_save) survives the ZeRO round trip (DeepSpeed#7669)
    head = {k: v for k, v in tensors.items() if "classifier" in k}
    assert {tuple(v.shape) for v in head.values()} == {(2, 32), (2,)}
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if "lora_B" in k), "no training step"


@pytest.mark.parametrize("name", CONFIGS)
def test_reloaded_adapter_reproduces_the_trained_models_probabilities(runs, name):
    assert_reload_reproduces_the_run(runs[name]["full"])


def assert_reload_reproduces_the_run(run: Path) -> None:
    """The run's adapter, loaded into its base with PEFT alone, gives the probabilities the run reported."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    summary = read_summary(run)
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    base_path = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=2)
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    rows = summary["sample_predictions"]
    assert rows
    encoded = tokenizer(
        [r["text"] for r in rows], truncation=True, max_length=32, padding=True, return_tensors="pt"
    )
    # the run's reported probabilities are calibrated: softmax(logits / T), T in calibration.json
    temperature = json.loads((run / "adapter" / "calibration.json").read_text())["temperature"]
    with torch.no_grad():
        probs = torch.softmax(model(**encoded).logits / temperature, dim=-1)
    for i, row in enumerate(rows):
        predicted = summary["labels"].index(row["after"])
        assert int(probs[i].argmax()) == predicted
        assert abs(float(probs[i, predicted]) - row["after_confidence"]) < 1e-5


@pytest.mark.parametrize("name", CONFIGS)
def test_resumed_run_ends_with_the_uninterrupted_adapter(runs, name):
    assert "resumed from" in runs[name]["resume_log"] and "step-2" in runs[name]["resume_log"]
    assert read_summary(runs[name]["resumed"])["global_step"] == 4
    full, resumed = adapter(runs[name]["full"]), adapter(runs[name]["resumed"])
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_a_resume_never_calls_a_torch_load_that_can_run_code(runs, name):
    """DeepSpeed's own checkpoint engine loads with torch.load(weights_only=False); scalelora replaces it.
    The resume ran with torch.load patched on every rank to refuse weights_only=False."""
    log = runs[name]["resume_log"]
    assert UNSAFE_LOAD not in log, log[-3000:]
    counts = re.findall(r"fault_inject: torch.load calls: (\d+) safe, (\d+) refused", log)
    assert len(counts) == 2 and all(int(safe) > 0 and refused == "0" for safe, refused in counts), counts


@pytest.mark.parametrize("name", CONFIGS)
def test_zero_matches_plain_ddp(runs, name):
    """Who scales, clips and steps differs under DeepSpeed; the result must not (fp32, same data order)."""
    ddp, zero = adapter(runs["ddp"]["full"]), adapter(runs[name]["full"])
    for key in ddp:
        torch.testing.assert_close(zero[key], ddp[key], atol=1e-5, rtol=1e-4)


# --- train.compile under ZeRO-2 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled_zero2(tmp_path_factory, tiny_bert, toy_data, ds_env):
    """A 4-step ZeRO-2 run with train.compile=true (DeepSpeed's engine.compile through Accelerate, with
    dynamo's `eager` backend: the compiled module and its names, without inductor's minutes), and a copy
    resumed from its step-2 checkpoint with train.compile=false. The base has no dropout: compiled
    code draws its dropout masks otherwise than eager, so only then can the two runs match."""
    root = tmp_path_factory.mktemp("zero2-compiled")
    base = save_tiny_model(
        root / "bert-no-dropout", "bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    config = sharded_variant("zero2", root)
    full = root / "full"
    result = run_cli(
        "scalelora.train",
        ["--config", "quickstart", *tiny_overrides(base, toy_data, full, **RUN, **{"train.compile": "true"})],
        env=ds_env,
        launcher=launcher(config, dynamo_backend="eager"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = interrupted_copy(full, root / "resumed")
    result = run_cli(
        "scalelora.train",
        ["--config", "quickstart", *tiny_overrides(base, toy_data, resumed, **RUN), "resume=auto"],
        env=ds_env,
        launcher=launcher(config),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {"full": full, "resumed": resumed, "resume_log": result.stderr}


def test_a_compiled_zero2_adapter_reloads_to_the_runs_predictions(compiled_zero2):
    """Compiled before `prepare`, DeepSpeed's module was torch.compile's wrapper: the adapter's names
    carried its `_orig_mod.` prefix, the shape check passed, and a reload loaded nothing."""
    full = compiled_zero2["full"]
    assert read_summary(full)["compiled"] is True and read_summary(full)["deepspeed"]["zero_stage"] == 2
    names = list(adapter(full))
    assert names and not [name for name in names if "_orig_mod" in name]
    assert_reload_reproduces_the_run(full)


def test_a_zero2_resume_with_train_compile_switched_off_ends_with_the_compiled_runs_adapter(compiled_zero2):
    assert "resumed from" in compiled_zero2["resume_log"] and "step-2" in compiled_zero2["resume_log"]
    assert read_summary(compiled_zero2["resumed"])["compiled"] is False
    full, resumed = adapter(compiled_zero2["full"]), adapter(compiled_zero2["resumed"])
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0)


def test_check_adapter_weights_refuses_the_few_byte_zero3_adapter(tmp_path):
    """The known ZeRO-3 failure (peft#2892, DeepSpeed#7900): a rank-local save writes empty LoRA tensors."""
    from safetensors.torch import save_file

    save_file(
        {
            "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight": torch.empty(0),
            "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight": torch.empty(0),
        },
        str(tmp_path / "adapter_model.safetensors"),
    )
    with pytest.raises(
        CheckpointError,
        match=r"lora_[AB]\.weight has shape \(0,\) \(expected rank 8\); the save gathered no weights",
    ):
        check_adapter_weights(tmp_path, r=8)


def test_multi_label_run_under_zero3(tiny_bert, toy_multilabel, tmp_path, ds_env):
    """Multi-label data under sharded ZeRO-3: float multi-hot labels through the engine, the adapter
    gathered whole, thresholds and temperature fitted after restore_best, and the reloaded adapter
    gives the run's reported (calibrated, thresholded) predictions."""
    from scalelora.predict import load_calibration, load_for_inference, predict_texts

    out = tmp_path / "ml-zero3"
    overrides = tiny_overrides(tiny_bert, toy_multilabel, out, **RUN)
    result = run_cli(
        "scalelora.train",
        ["--config", "quickstart", *overrides],
        env=ds_env,
        launcher=launcher(sharded_variant("zero3", tmp_path)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(out)
    assert summary["deepspeed"]["zero_stage"] == 3 and summary["problem_type"] == "multi_label"
    assert summary["eval"]["test"]["num_examples"] == 40 and "tuned" in summary["eval"]["test"]
    assert check_adapter_weights(out / "adapter", r=8) > 0
    head = {k: v for k, v in adapter(out).items() if "classifier" in k}
    assert {tuple(v.shape) for v in head.values()} == {(3, 32), (3,)}
    model, tokenizer, labels, max_length = load_for_inference(out / "adapter")
    rows = summary["sample_predictions"]
    got = predict_texts(
        model,
        tokenizer,
        labels,
        [r["text"] for r in rows],
        max_length,
        calibration=load_calibration(out, model, labels),
    )
    for row, line in zip(rows, got, strict=True):
        assert [line["probs"][k] for k in row["after"]] == pytest.approx(row["after_confidence"], abs=1e-5)


def test_4bit_base_trains_under_zero3(tiny_bert, toy_data, tmp_path, ds_env):
    """QLoRA under ZeRO-3: the 4-bit storage dtype equals model.dtype, so ZeRO can shard it, and no
    device_map is passed (transformers refuses one under ZeRO-3)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    out = tmp_path / "qlora-zero3"
    overrides = tiny_overrides(tiny_bert, toy_data, out, **{**RUN, "train.max_steps": 2, "eval.every": 2})
    result = run_cli(
        "scalelora.train",
        ["--config", "quickstart", *overrides, "model.load_in_4bit=true"],
        env=ds_env,
        launcher=launcher(sharded_variant("zero3", tmp_path)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_summary(out)["deepspeed"]["zero_stage"] == 3
    assert check_adapter_weights(out / "adapter", r=8) > 0


# --- non-finite steps under ZeRO-2 -------------------------------------------------------------------------

NAN_RUN = {**RUN, "checkpoint.every": 1, "checkpoint.keep_last": 10}
# rank 1's loss turns NaN at step 3 while its gradients stay finite: DeepSpeed's own overflow check
# would not see it, and the engine steps inside backward, before the trainer can decide anything
NAN_FAULT = "forward:3:nanloss@1"


def trainable_module_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The LoRA and head weights of a DeepSpeed checkpoint this test module just wrote (a torch pickle:
    DeepSpeed has no other format; it is read here, in a test, from a run of the test itself)."""
    states = torch.load(next(checkpoint.rglob("*model_states.pt")), map_location="cpu", weights_only=False)
    return {k: v for k, v in states["module"].items() if "lora_" in k or "modules_to_save" in k}


@pytest.fixture(scope="module")
def nan_runs(tiny_bert, toy_data, tmp_path_factory, ds_env):
    """ZeRO-2, 2 processes, NAN_FAULT: once with on_nonfinite=skip, once with stop."""
    root = tmp_path_factory.mktemp("deepspeed-nan")
    config = sharded_variant("zero2", root)
    out = {}
    for policy in ("skip", "stop"):
        run = root / policy
        args = tiny_overrides(tiny_bert, toy_data, run, **{**NAN_RUN, "train.on_nonfinite": policy})
        command = [*launcher(config), str(ROOT / "tests" / "fault_inject.py"), "--fault", NAN_FAULT, "--"]
        done = subprocess.run(
            [*command, "--config", "quickstart", *args],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **ds_env},
            cwd=ROOT,
            timeout=600,
        )
        out[policy] = {"dir": run, "code": done.returncode, "log": done.stderr}
    return out


def test_nonfinite_skip_under_zero2_discards_the_step_on_every_rank(nan_runs):
    run = nan_runs["skip"]
    assert run["code"] == 0, run["log"][-3000:]
    assert "non-finite loss or gradient at step 3; step skipped" in run["log"]
    assert read_summary(run["dir"])["nonfinite_skipped"] == 1
    step2, step3 = (trainable_module_weights(run["dir"] / "checkpoints" / f"step-{n}") for n in (2, 3))
    assert step2.keys() == step3.keys() and step2
    for key in step2:
        assert torch.equal(step2[key], step3[key]), f"the skipped step 3 changed {key}"


def test_nonfinite_stop_under_zero2_saves_the_last_good_state(nan_runs):
    run = nan_runs["stop"]
    # torchrun reports the workers' exit code 3 with a traceback of its own; the workers print none
    assert run["code"] != 0 and "]: Traceback" not in run["log"], run["log"][-3000:]
    errors = [line for line in run["log"].splitlines() if line.startswith("scalelora: error:")]
    assert errors and all("non-finite loss or gradient at step 3" in line for line in errors), run["log"][
        -2000:
    ]
    assert "exit code 3" in run["log"]
    newest = sorted((run["dir"] / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    assert json.loads((newest / "trainer_state.json").read_text())["global_step"] == 2
    assert not (run["dir"] / "summary.json").exists()
    last_good = trainable_module_weights(nan_runs["skip"]["dir"] / "checkpoints" / "step-2")
    saved = trainable_module_weights(newest)
    for key in last_good:
        assert torch.equal(saved[key], last_good[key]), f"the saved state is not the last good one: {key}"


# --- the shipped ZeRO-3 configs, evaluating mid-training and distilling from `self` --------------------------


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, tiny_bert) -> Path:
    """A base with a saved head: distill.teacher=self refuses a newly initialised one."""
    return save_tiny_classifier(tmp_path_factory.mktemp("tiny-classifier"), tiny_bert)


@pytest.mark.parametrize("name", ["zero3", "zero3_offload"])
def test_shipped_zero3_configs_evaluate_mid_training_and_distill_from_self(
    name, tiny_classifier, toy_data, tmp_path, ds_env
):
    """Forwards under torch.inference_mode while ZeRO-3 gathers parameters left inference tensors resident,
    and the next training step failed ("Setting requires_grad=True on inference tensor outside
    InferenceMode"). The shipped configs, not a test variant."""
    out = tmp_path / name
    settings = {
        "train.max_steps": 4,
        "eval.every": 2,
        "distill.enabled": "true",
        "distill.teacher": "self",
        "lora.dropout": 0.0,
    }
    result = run_cli(
        "scalelora.train",
        ["--config", "quickstart", *tiny_overrides(tiny_classifier, toy_data, out, **settings)],
        env=ds_env,
        launcher=launcher(ROOT / "accel_configs" / CONFIGS[name][0]),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(out)
    assert summary["global_step"] == 4 and summary["deepspeed"]["zero_stage"] == 3
    assert summary["distill"]["enabled"] and summary["distill"]["teacher"] == "self"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "validation"] == [2, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["split"] == "train")
    assert check_adapter_weights(out / "adapter", r=8) > 0


# --- ZeRO-3 in bf16, distilling from a separate teacher model ----------------------------------------------

BF16_KD_RUN = {
    **RUN,
    "train.max_steps": 2,
    "eval.every": 2,
    "checkpoint.every": 2,
    "train.precision": "bf16",
    "distill.enabled": "true",
    "train.lr": 2e-2,  # LoRA moves the probabilities by more than the bf16 tolerance below
    "eval.calibrate": "false",  # raw probabilities: a fitted temperature would flatten their differences
}
# a probability computed from bf16 logits against the same one in float32: bf16 keeps 8 significant bits
BF16_PROB_TOLERANCE = 2**-8
# the trainer on each rank, its ModelTeacher recording the first batch it sees and its logits for it
RECORD_TEACHER = """\
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from scalelora import teacher, train

record = Path(sys.argv[1]) / f"teacher-rank{os.environ['RANK']}.safetensors"
call = teacher.ModelTeacher.__call__


def recording(self, model, batch, idx, want_hidden):
    out = call(self, model, batch, idx, want_hidden)
    if not record.exists():
        tensors = {**batch, "teacher_logits": out.logits}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(record))
    return out


teacher.ModelTeacher.__call__ = recording
sys.exit(train.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def zero3_bf16_kd(tiny_classifier, tiny_bert, toy_data, tmp_path_factory, ds_env):
    """One 2-step run under ZeRO-3 with LoRA partitioned too, train.precision=bf16, distilling from a
    teacher folder (another classifier): the student's base is built under zero.Init in bf16."""
    root = tmp_path_factory.mktemp("zero3-bf16-kd")
    teacher = save_tiny_classifier(root / "teacher", tiny_bert, seed=2)
    script = root / "record_teacher.py"
    script.write_text(RECORD_TEACHER)
    out = root / "run"
    args = tiny_overrides(tiny_classifier, toy_data, out, **BF16_KD_RUN, **{"distill.teacher": teacher})
    done = subprocess.run(
        [*launcher(sharded_variant("zero3", root)), str(script), str(root), "--config", "quickstart", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **ds_env},
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"out": out, "teacher": teacher, "records": sorted(root.glob("teacher-rank*.safetensors"))}


def test_zero3_bf16_trains_lora_with_fp32_masters_and_its_adapter_reloads_in_fp32(zero3_bf16_kd):
    """DeepSpeed casts no module built under zero.Init (it is already in bf16), and the LoRA and head
    weights were float32: the first forward failed ("mat1 and mat2 must have the same dtype, but got
    BFloat16 and Float"). They now train in bf16, as under ZeRO-2, with DeepSpeed's float32 master
    copies; the bf16 adapter, reloaded into a float32 base in one process, gives the run's predictions."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = zero3_bf16_kd["out"]
    summary = read_summary(out)
    assert summary["global_step"] == 2 and summary["precision"] == "bf16"
    assert summary["deepspeed"]["zero_stage"] == 3 and summary["deepspeed"]["bf16"]
    assert check_adapter_weights(out / "adapter", r=8) > 0
    tensors = adapter(out)
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if "lora_B" in k), "no training step"
    # each rank's float32 partition of the trainable weights (a checkpoint this test's run wrote)
    masters = [
        torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]["fp32_flat_groups"]
        for path in sorted(out.rglob("*optim_states.pt"))
    ]
    assert len(masters) == 2 and {t.dtype for rank in masters for t in rank} == {torch.float32}
    assert sum(t.numel() for rank in masters for t in rank) == summary["trainable_params"]

    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    base_path = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForSequenceClassification.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    rows = summary["sample_predictions"]
    encoded = tokenizer(
        [r["text"] for r in rows], truncation=True, max_length=32, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        probs = torch.softmax(model(**encoded).logits, dim=-1)
    # the run computed them in bf16, the reload in float32 (2e-4 apart here; 1.2e-2 without the LoRA weights)
    for i, row in enumerate(rows):
        predicted = summary["labels"].index(row["after"])
        assert int(probs[i].argmax()) == predicted
        assert abs(float(probs[i, predicted]) - row["after_confidence"]) < BF16_PROB_TOLERANCE


def test_model_teacher_under_zero3_is_whole_and_gives_its_single_process_logits(zero3_bf16_kd):
    """transformers built `distill.teacher=<path>` under zero.Init, and as it is never handed to
    DeepSpeed nothing gathered its partitioned weights ("'weight' must be 2-D" at the first step). Loaded
    outside zero.Init, each rank's teacher gives, on the batch it saw, the logits of a single-process load
    of the folder (float32 weights, model.dtype, run under the run's bf16 autocast as the student's forward
    is), and the KD run finishes."""
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(
        zero3_bf16_kd["teacher"], dtype=torch.float32
    )
    teacher.eval()
    assert len(zero3_bf16_kd["records"]) == 2
    for record in zero3_bf16_kd["records"]:
        batch = load_file(str(record))
        logits = batch.pop("teacher_logits")
        assert logits.dtype == torch.float32
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            expected = teacher(**batch).logits.float()
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
        with torch.no_grad():
            # and within bf16's rounding of the float32 forward (2e-3 apart here)
            torch.testing.assert_close(logits, teacher(**batch).logits, atol=2e-2, rtol=0)
    out = zero3_bf16_kd["out"]
    summary = read_summary(out)
    assert summary["global_step"] == 2
    assert summary["distill"]["enabled"] and summary["distill"]["teacher"] == str(zero3_bf16_kd["teacher"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["split"] == "train"]
    assert train and all(torch.isfinite(torch.tensor(loss)) for loss in train)


# --- a planted pickle in a ZeRO-2 checkpoint -------------------------------------------------------------------


# --- pickles planted in DeepSpeed checkpoints -------------------------------------------------------------------


class RunsCode:
    """Unpickling it creates `marker`: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "scalelora: error:" in line]


# DeepSpeed finds its model states by glob (`_get_all_ckpt_names`) and, with two matches, unpickles both
PLANTED = {
    "zero2": "pytorch_model/mp_rank_!_model_states.pt",
    "zero3": "pytorch_model/zero_pp_rank_0_mp_rank_!_model_states.pt",
}


@pytest.mark.parametrize("name", PLANTED)
def test_an_unlisted_pickle_planted_where_deepspeed_globs_never_runs(
    runs, name, tiny_bert, toy_data, tmp_path, ds_env
):
    """A payload under any name DeepSpeed's glob matches, left out of the signed manifest (which the
    attacker cannot re-sign), is refused by name before anything is loaded."""
    out = interrupted_copy(runs[name]["full"], tmp_path / "out")
    marker = tmp_path / "pwned"
    planted = out / "checkpoints" / "step-2" / PLANTED[name]
    torch.save({"module": RunsCode(marker)}, planted)
    result = run_cli(
        "scalelora.train",
        ["--config", "quickstart", *tiny_overrides(tiny_bert, toy_data, out, **RUN), "resume=auto"],
        env=ds_env,
        launcher=launcher(runs[name]["config"]),
    )
    assert not marker.exists(), "resuming ran code from a pickle planted in the checkpoint"
    assert result.returncode != 0
    errors = error_lines(result.stderr)
    assert errors and all(f"{planted}, which its manifest does not list" in line for line in errors), (
        result.stderr[-3000:]
    )


def test_a_pickle_planted_in_a_zero2_checkpoint_never_runs(runs, tiny_bert, toy_data, tmp_path, ds_env):
    """An attacker who can write into output_dir replaces a listed DeepSpeed file with a pickle and rewrites
    the manifest to match, but cannot sign it with this user's key: the checkpoint is refused before
    anything is loaded (`claim` verifies it first: checked here in-process). With
    checkpoint.trust_unsigned=true, which waives the signature only, the resume loads the file with
    weights_only=True, which refuses the payload's type by name."""
    from scalelora import checkpoint as ckpt
    from scalelora import signing
    from scalelora.errors import UntrustedCheckpointError

    out = interrupted_copy(runs["zero2"]["full"], tmp_path / "out")
    newest = ckpt.checkpoint_dirs(out / "checkpoints")[-1]
    marker = tmp_path / "pwned"
    victim = newest / "pytorch_model" / "mp_rank_00_model_states.pt"
    torch.save({"module": RunsCode(marker)}, victim)
    forge = (
        "from pathlib import Path; from scalelora import checkpoint; checkpoint.write_manifest(Path({!r}))"
    )
    attacker = {**os.environ, signing.KEY_ENV: str(tmp_path / "attacker.key")}
    subprocess.run([sys.executable, "-c", forge.format(str(newest))], check=True, env=attacker)
    with pytest.raises(
        UntrustedCheckpointError, match="signed with another key.*checkpoint.trust_unsigned=true"
    ):
        ckpt.latest_valid_checkpoint(out / "checkpoints")

    result = run_cli(
        "scalelora.train",
        [
            "--config",
            "quickstart",
            *tiny_overrides(tiny_bert, toy_data, out, **RUN),
            "resume=auto",
            "checkpoint.trust_unsigned=true",
        ],
        env=ds_env,
        launcher=launcher(runs["zero2"]["config"]),
    )
    assert not marker.exists(), "checkpoint.trust_unsigned=true let a planted pickle run code"
    assert result.returncode != 0
    errors = error_lines(result.stderr)
    assert errors and all(
        f"refused to load {victim}: it holds a posix.mkdir object" in line for line in errors
    ), result.stderr[-3000:]


def test_the_verified_engine_loads_only_listed_matching_files_without_running_code(runs, tmp_path):
    """The checkpoint engine scalelora puts in DeepSpeed's place: a real ZeRO-3 optimizer state loads
    (its DeepSpeed types are allowlisted); a payload, an unlisted file, a file changed after it was
    listed and a path outside the folder are refused, each with one line naming it."""
    from scalelora import checkpoint as ckpt
    from scalelora import safe_load

    folder = tmp_path / "step-2"
    shutil.copytree(runs["zero3"]["full"] / "checkpoints" / "step-2", folder)
    engine = safe_load.verified_engine(safe_load.ListedFiles(folder, ckpt.verify_manifest(folder)), None)
    states = folder / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    loaded = engine.load(str(states), map_location="cpu")
    assert loaded["ds_version"] and "optimizer_state_dict" in loaded

    marker = tmp_path / "pwned"
    payload = folder / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": RunsCode(marker)}, payload)
    listed = ckpt.hash_files(folder)
    engine = safe_load.verified_engine(safe_load.ListedFiles(folder, listed), None)
    with pytest.raises(CheckpointError, match=f"refused to load {payload}: it holds a posix.mkdir object"):
        engine.load(str(payload))
    assert not marker.exists()
    unlisted = folder / "pytorch_model" / "zero_pp_rank_0_mp_rank_!_model_states.pt"
    shutil.copy(states, unlisted)
    with pytest.raises(
        CheckpointError,
        match=f"refused to load {re.escape(str(unlisted))}: the checkpoint's manifest does not list it",
    ):
        engine.load(str(unlisted))
    torch.save({"module": {}}, states)
    with pytest.raises(CheckpointError, match="does not match its checksum|bytes, the manifest says"):
        engine.load(str(states))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        engine.load(str(folder / ".." / "elsewhere.pt"))


def test_the_fp16_loss_scaler_loads_through_the_allowlist():
    """fp16 needs a GPU, so its optimizer state's DynamicLossScaler is built here as DeepSpeed builds it."""
    import io

    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

    from scalelora import safe_load

    args = {"init_scale": 2**16, "scale_window": 1000, "delayed_shift": 2, "consecutive_hysteresis": False}
    scaler = CreateLossScaler(
        torch.float16, 0, True, {**args, "min_scale": 1, "raise_error_at_min_scale": True}
    )
    buffer = io.BytesIO()
    torch.save({"loss_scaler": scaler, "dynamic_loss_scale": True}, buffer)
    buffer.seek(0)
    loaded = safe_load.torch_load(buffer, "optim_states.pt", allow=safe_load.deepspeed_allowlist())[
        "loss_scaler"
    ]
    assert type(loaded) is type(scaler) and vars(loaded) == vars(scaler)


def test_the_allowlist_holds_every_deepspeed_type_of_the_real_checkpoints(runs):
    """The types allowed for DeepSpeed's files are those its ZeRO-2, ZeRO-3 and ZeRO-3 + offload
    checkpoints hold (plus the fp16 loss scaler); the RNG files' numpy types are Accelerate's own list."""
    from scalelora import safe_load

    allowed = {f"{t.__module__}.{t.__qualname__}" for t in safe_load.deepspeed_allowlist()}
    found = set()
    for name in CONFIGS:
        for path in (runs[name]["full"] / "checkpoints").rglob("*.pt"):
            found |= set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    assert found and found <= allowed, found - allowed
