"""The DeepSpeed accelerate configs: each loads, points at a JSON that exists, and resolves (the way
Accelerate fills "auto") to exactly what the scalelora config says, so the two never disagree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from scalelora.config import load_config
from scalelora.errors import ConfigError
from scalelora.runtime import check_deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED_YAMLS = sorted((ROOT / "accel_configs").glob("deepspeed_*.yaml"))
# what each file promises: ZeRO stage, optimizer offload device, parameter offload device
EXPECTED = {
    "deepspeed_zero2.yaml": (2, "none", "none"),
    "deepspeed_zero3.yaml": (3, "none", "none"),
    "deepspeed_zero3_offload.yaml": (3, "cpu", "cpu"),
    "deepspeed_zero3_multinode.yaml": (3, "none", "none"),
}
# values Accelerate must fill from the run (the scalelora config or the model), never hard-coded in the JSON
AUTO_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
)


def resolve(
    json_path: Path, batch_size: int, grad_accum: int, max_grad_norm: float, precision: str, world: int
):
    """The DeepSpeed config Accelerate hands to deepspeed.initialize (mirrors Accelerator._prepare_deepspeed)."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=str(json_path), gradient_clipping=max_grad_norm)
    plugin.set_mixed_precision(precision)
    hidden = 384
    plugin.deepspeed_config_process(
        must_match=False,
        train_micro_batch_size_per_gpu=batch_size,
        train_batch_size=batch_size * grad_accum * world,
        gradient_accumulation_steps=grad_accum,
        **{
            "zero_optimization.reduce_bucket_size": hidden * hidden,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
        },
    )
    return plugin.deepspeed_config


def test_all_deepspeed_configs_are_covered():
    assert {p.name for p in DEEPSPEED_YAMLS} == set(EXPECTED)


@pytest.mark.parametrize("path", DEEPSPEED_YAMLS, ids=lambda p: p.name)
def test_deepspeed_yaml_points_at_an_auto_json(path):
    from accelerate.commands.config.config_args import load_config_from_file

    accel = load_config_from_file(str(path))
    assert accel.distributed_type.value == "DEEPSPEED"
    assert not accel.use_cpu  # use_cpu/--cpu silently switches DeepSpeed off
    ds_file = ROOT / accel.deepspeed_config["deepspeed_config_file"]
    assert ds_file.is_file()
    raw = json.loads(ds_file.read_text())
    for key in AUTO_KEYS:
        assert raw[key] == "auto", f"{ds_file.name}: {key} must be auto (it comes from the scalelora config)"
    assert raw["bf16"]["enabled"] == "auto" and raw["fp16"]["enabled"] == "auto"
    # scalelora's train.lr/scheduler drive the optimizer; a DeepSpeed block would silently win
    assert "optimizer" not in raw and "scheduler" not in raw
    stage, offload_opt, offload_param = EXPECTED[path.name]
    zero = raw["zero_optimization"]
    assert zero["stage"] == stage
    assert zero.get("offload_optimizer", {}).get("device", "none") == offload_opt
    assert zero.get("offload_param", {}).get("device", "none") == offload_param
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # else get_state_dict cannot gather
        assert accel.deepspeed_config["zero3_init_flag"] is True


@pytest.mark.parametrize("path", DEEPSPEED_YAMLS, ids=lambda p: p.name)
@pytest.mark.parametrize(
    ("batch_size", "grad_accum", "max_grad_norm", "precision", "world"),
    [(8, 4, 0.5, "bf16", 2), (32, 1, 1.0, "fp16", 16), (16, 2, 0.0, "no", 8)],
)
def test_deepspeed_config_resolves_to_the_scalelora_values(
    path, batch_size, grad_accum, max_grad_norm, precision, world
):
    accel = yaml.safe_load(path.read_text())
    resolved = resolve(
        ROOT / accel["deepspeed_config"]["deepspeed_config_file"],
        batch_size,
        grad_accum,
        max_grad_norm,
        precision,
        world,
    )
    assert "auto" not in json.dumps(resolved)
    assert resolved["train_micro_batch_size_per_gpu"] == batch_size
    assert resolved["gradient_accumulation_steps"] == grad_accum
    assert resolved["train_batch_size"] == batch_size * grad_accum * world
    assert resolved["gradient_clipping"] == max_grad_norm
    assert resolved["bf16"]["enabled"] is (precision == "bf16")
    assert resolved["fp16"]["enabled"] is (precision == "fp16")


def test_multinode_template_uses_c10d_and_a_standard_launcher():
    accel = yaml.safe_load((ROOT / "accel_configs" / "deepspeed_zero3_multinode.yaml").read_text())
    assert accel["num_machines"] > 1
    assert accel["rdzv_backend"] == "c10d"
    assert (
        accel["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"
    )  # torchrun per node, no pdsh


@pytest.mark.parametrize(
    ("overrides", "ds_config", "message"),
    [
        (
            ["model.load_in_8bit=true"],
            {"zero_optimization": {"stage": 3}},
            r"load_in_8bit cannot be sharded by ZeRO-3",
        ),
        (
            ["model.load_in_4bit=true"],
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}},
            r"8/4-bit base cannot be offloaded",
        ),
        (
            [],
            {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}},
            r"defines an 'optimizer' block",
        ),
        (
            [],
            {"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}},
            r"defines a?n? ?'scheduler' block",
        ),
    ],
)
def test_deepspeed_refusals_say_what_to_use_instead(overrides, ds_config, message):
    cfg = load_config("quickstart", overrides)
    with pytest.raises(ConfigError, match=message) as err:
        check_deepspeed_config(cfg, ds_config)
    assert " use " in str(err.value) or "remove it" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "stage"),
    [(["model.load_in_8bit=true"], 2), (["model.load_in_4bit=true"], 3), ([], 3)],
)
def test_deepspeed_combinations_that_work_pass(overrides, stage):
    check_deepspeed_config(load_config("quickstart", overrides), {"zero_optimization": {"stage": stage}})
