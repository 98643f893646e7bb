"""The cases of scripts/gpu_check.sh, in the order they run: by value, so that a run cut off by its time
budget still answers the most important ones. Plain data (no torch import): the check, its dry run and
tests/test_gpu_check.py all read this table.

Each case trains a LoRA (r=8) with `python -m scalelora.train --config quickstart` plus `BASE`, `TOY` (on
the random Llama) and the case's overrides, on one GPU or through `accelerate launch` with a DeepSpeed config; `cli` cases run other
entry points on an earlier case's run. `expect` is the planning figure, in seconds on one H100, that the
budget uses to decide whether a case still fits; until a committed report gives real ones they are
estimates. `timeout` is the most a case may take before it is killed and reported as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LORA_R = 8
STEPS = 40
# the overrides of every training case (the check fills in {model}, {data}, {out}, {steps}, {half}, {teacher})
BASE = ("model.name={model}", "data.path={data}", "output_dir={out}", f"lora.r={LORA_R}", "overwrite=true")
# and of every case on the random Llama and its toy data: short runs, one evaluation at the end
TOY = (
    "data.max_length=64",
    "train.batch_size=16",
    "train.eval_batch_size=64",
    "train.max_steps={steps}",
    "train.lr=1e-3",
    "train.log_every=10",
    "eval.every={steps}",
)
# accelerate configs by launch kind; ZeRO-3 variants get stage3_param_persistence_threshold 0 (see
# gpu_check.deepspeed_configs): with "auto" no LoRA tensor is partitioned and a few-byte adapter cannot show
ACCEL_CONFIGS = {
    "zero2": "accel_configs/deepspeed_zero2.yaml",
    "zero3": "accel_configs/deepspeed_zero3.yaml",
    "zero3_offload": "accel_configs/deepspeed_zero3_offload.yaml",
}


@dataclass(frozen=True)
class Case:
    name: str
    why: str
    """What a pass shows (one line, for the report)."""
    launch: str = "single"
    """`single` (python -m scalelora.train, one GPU), a key of ACCEL_CONFIGS, or `cli`."""
    overrides: tuple[str, ...] = ()
    model: str = "llama"
    """`llama` (a random SmolLM2-135M-shaped model the check builds, toy data) or `minilm` (the carried
    bfloat16 MiniLM-L6 on the carried rotten_tomatoes)."""
    needs: str | None = None
    """A case whose finished run this one starts from; run first when its run is missing."""
    checks: tuple[str, ...] = ()
    """Checks beyond the ones every training case gets (see gpu_check.check_case)."""
    timeout: int = 150
    expect: int = 35
    precision: str = field(init=False, default="no")

    def __post_init__(self) -> None:
        for item in self.overrides:
            if item.startswith("train.precision="):
                object.__setattr__(self, "precision", item.split("=", 1)[1])


CASES = [
    Case(
        "bf16",
        "bf16 autocast on one GPU: the default GPU run trains and saves a complete adapter",
        overrides=("train.precision=bf16",),
        timeout=120,
        expect=25,
    ),
    Case(
        "zero3",
        "ZeRO-3 (fp32): the adapter is gathered, not a few-byte shard, and a plain PEFT reload reproduces "
        "the run's calibrated probabilities to 1e-3",
        launch="zero3",
        overrides=("train.precision=no", "checkpoint.every={half}"),
        checks=("reload",),
        timeout=180,
        expect=45,
    ),
    Case(
        "zero3_bf16",
        "ZeRO-3 in bf16 (DeepSpeed casts the module, fp32 master weights): the usual multi-GPU setting",
        launch="zero3",
        overrides=("train.precision=bf16",),
        timeout=180,
        expect=40,
    ),
    Case(
        "4bit",
        "QLoRA: an nf4 base on bitsandbytes' CUDA kernels",
        overrides=("train.precision=bf16", "model.load_in_4bit=true"),
        timeout=150,
        expect=30,
    ),
    Case(
        "zero3_resume",
        "ZeRO-3 resumed from zero3's middle checkpoint ends with zero3's adapter (1e-3)",
        launch="zero3",
        overrides=("train.precision=no", "checkpoint.every={half}", "overwrite=false", "resume=auto"),
        needs="zero3",
        checks=("same_adapter_as:zero3",),
        timeout=180,
        expect=35,
    ),
    Case(
        "minilm_bf16",
        "the quickstart recipe as it ships (MiniLM-L6, rotten_tomatoes, 2 epochs) with bfloat16 weights in "
        "bf16 reaches 0.80 validation accuracy (fp32 on the CPU: 0.8236, benchmarks/results/cpu-minilm-ttr.json)",
        overrides=("train.precision=bf16", "model.dtype=bfloat16"),
        model="minilm",
        checks=("min_accuracy:0.80",),
        timeout=180,
        expect=40,
    ),
    Case(
        "zero2",
        "ZeRO-2 in bf16: optimizer state and gradients sharded",
        launch="zero2",
        overrides=("train.precision=bf16",),
        timeout=180,
        expect=40,
    ),
    Case(
        "kd_zero3",
        "distillation from a separate model teacher under ZeRO-3 (fp32)",
        launch="zero3",
        overrides=(
            "train.precision=no",
            "distill.enabled=true",
            "distill.teacher={teacher}",
            "distill.weight=0.5",
        ),
        checks=("distilled",),
        timeout=180,
        expect=45,
    ),
    Case(
        "predict_export",
        "predict and export --merge on bf16's adapter with the image's transformers and PEFT (on the CPU, as "
        "they run): predict's test accuracy is the run's (0.02), the merged model its logits (export's check)",
        launch="cli",
        needs="bf16",
        checks=("predict_export:bf16",),
        timeout=150,
        expect=30,
    ),
    Case(
        "fp16",
        "fp16 autocast with a gradient scaler on one GPU",
        overrides=("train.precision=fp16",),
        timeout=120,
        expect=25,
    ),
    Case(
        "zero2_fp16",
        "fp16 under DeepSpeed (ZeRO-2, its dynamic loss scale): overflow steps are skipped, the run finishes",
        launch="zero2",
        overrides=("train.precision=fp16",),
        timeout=180,
        expect=40,
    ),
    Case(
        "grad_ckpt",
        "gradient checkpointing (bf16): trains, and its peak GPU memory is below bf16's",
        overrides=("train.precision=bf16", "model.gradient_checkpointing=true"),
        checks=("peak_below:bf16",),
        timeout=120,
        expect=25,
    ),
    Case(
        "compile",
        "torch.compile on CUDA (bf16, MiniLM-L6), compilation included",
        overrides=(
            "train.precision=bf16",
            "model.dtype=bfloat16",
            "train.compile=true",
            "train.max_steps={steps}",
            "eval.every={steps}",
        ),
        model="minilm",
        checks=("compiled",),
        timeout=300,
        expect=120,
    ),
    Case(
        "8bit",
        "LLM.int8: an 8-bit base on bitsandbytes' CUDA kernels",
        overrides=("train.precision=bf16", "model.load_in_8bit=true"),
        timeout=150,
        expect=30,
    ),
    Case(
        "zero3_offload",
        "ZeRO-3 with parameters and optimizer state in CPU memory (bf16; DeepSpeedCPUAdam, built on first use)",
        launch="zero3_offload",
        overrides=("train.precision=bf16",),
        timeout=300,
        expect=120,
    ),
    Case(
        "4bit_zero3",
        "QLoRA under ZeRO-3: the 4-bit storage dtype follows model.dtype so ZeRO can shard it",
        launch="zero3",
        overrides=("train.precision=bf16", "model.load_in_4bit=true", "model.dtype=bfloat16"),
        timeout=180,
        expect=45,
    ),
]
BY_NAME = {case.name: case for case in CASES}


def select(only: list[str] | None) -> list[Case]:
    """`only` (or every case) in table order. Raises KeyError naming an unknown case."""
    if not only:
        return list(CASES)
    unknown = [name for name in only if name not in BY_NAME]
    if unknown:
        raise KeyError(f"unknown case(s) {', '.join(unknown)}; the cases are {', '.join(BY_NAME)}")
    return [case for case in CASES if case.name in set(only)]
