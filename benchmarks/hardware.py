"""The hardware's own limit: measured GEMM throughput at a model's matmul shapes, and the FLOPs of one
LoRA training step counted from real tokens.

`mfu_measured_gemm` in the benchmark is (LoRA step FLOPs / step seconds) / (GEMM FLOP/s measured here,
on the same machine with the same threads): the share of what this machine's matmul kernels can do at
these shapes that the training loop turns into useful work.

FLOPs of a LoRA step, per matmul of `m` multiply-adds (2m FLOPs forward):
- forward: 2m;
- activation gradient (dX = dY W^T): 2m, wherever something below needs it: everywhere except the
  first layer's Q/K/V projections, whose input (the frozen embeddings) needs none;
- weight gradient (dW = X^T dY): 2m for trainable weights only (LoRA A/B, the head), never for the
  frozen base;
- attention (QK^T and AV, no weights): per layer 2 * width multiply-adds per (query, key) pair forward,
  twice that backward (both inputs need gradients; in the first layer only those that lead to a
  trainable weight); pairs counted over real tokens, sum(length^2) (a causal model: (length^2 +
  length) / 2 per example);
- the pooler and the classification head run once per example, the rest once per real token.
Padding, embeddings lookups, layer norms, activations, softmax and dropout are not counted: they are
not matmul work, and the point is how much of the time goes into it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

# Projections that read a transformer layer's input (per architecture).
QKV_NAMES = {
    "query",
    "key",
    "value",
    "q_lin",
    "k_lin",
    "v_lin",
    "q_proj",
    "k_proj",
    "v_proj",
    "c_attn",
    "qkv_proj",
}
Q_NAMES, K_NAMES, V_NAMES = (
    {"query", "q_lin", "q_proj"},
    {"key", "k_lin", "k_proj"},
    {"value", "v_lin", "v_proj"},
)
FUSED_QKV = {"c_attn", "qkv_proj"}
ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "mpnet", "deberta-v2"}
LAYER_INDEX = re.compile(r"\.(?:layer|layers|h)\.(\d+)\.")


@dataclass
class StepFlops:
    """FLOPs of one LoRA training step as a linear function of the step's real-token statistics."""

    per_token: float
    """Per real token: every matmul inside the transformer layers."""
    per_pair: float
    """Per (query, key) pair of real tokens: attention, summed over layers."""
    per_example: float
    """Per example: the pooler and the classification head."""
    causal: bool

    def __call__(self, tokens: int, token_pairs: int, examples: int) -> float:
        """FLOPs for `examples` examples holding `tokens` real tokens and `token_pairs` = sum of length^2."""
        pairs = (token_pairs + tokens) / 2 if self.causal else token_pairs
        return self.per_token * tokens + self.per_pair * pairs + self.per_example * examples


def linear_shape(module: Any) -> tuple[int, int] | None:
    """(in, out) features of an nn.Linear or a GPT-2 Conv1D; None for anything else."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight is (in, out)
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def attention_width(config: Any) -> int:
    """heads x head dimension: the width of Q (and of AV, after grouped K/V heads are repeated)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(heads * head_dim)


def step_flops(model: Any) -> StepFlops:
    """Count the FLOPs of a LoRA step of `model` (a PEFT-wrapped sequence classifier; meta tensors do)."""
    config = model.config
    per_token = per_example = 0.0
    layers: set[int] = set()
    first_layer_targets: set[str] = set()
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is None or ".original_module" in name:  # PEFT keeps the head's original copy unused
            continue
        parts = name.split(".")
        found = LAYER_INDEX.search(f".{name}.")
        layer = int(found.group(1)) if found else None
        if layer is not None:
            layers.add(layer)
        # a LoRA wrapper's pieces are `<projection>.base_layer`, `<projection>.lora_A.<adapter>`, ...
        lora_part = next((p for p in parts if p in ("base_layer", "lora_A", "lora_B")), None)
        projection = parts[parts.index(lora_part) - 1] if lora_part else parts[-1]
        trainable = any(p.requires_grad for p in module.parameters(recurse=False))
        reads_layer_input = projection in QKV_NAMES and lora_part in (None, "base_layer", "lora_A")
        input_grad = not (layer == 0 and reads_layer_input)
        if layer == 0 and lora_part == "lora_A":
            first_layer_targets.add(projection)
        flops = 2 * shape[0] * shape[1] * (1 + int(trainable) + int(input_grad))
        if layer is None:
            per_example += flops
        else:
            per_token += flops
    width = attention_width(config)
    # the first layer's attention: forward always; dQ only when Q leads to a LoRA weight, and so on
    targets = first_layer_targets
    fused = bool(targets & FUSED_QKV)
    q_grad = fused or bool(targets & Q_NAMES)
    k_grad = fused or bool(targets & K_NAMES)
    v_grad = fused or bool(targets & V_NAMES)
    first = 2 * width * (2 + q_grad + k_grad + (q_grad or k_grad) + v_grad)
    others = 2 * width * 6 * max(len(layers) - 1, 0)
    causal = getattr(config, "model_type", "") not in ENCODERS
    return StepFlops(per_token=per_token, per_pair=first + others, per_example=per_example, causal=causal)


def lora_model_on_meta(model_path: str, lora_cfg: Any, num_labels: int) -> Any:
    """The benchmark's classifier + LoRA (scalelora's targets and head) built on the meta device: shapes
    and trainable flags without loading weights."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from scalelora.models import head_modules, peft_lora_config, quiet_peft, resolve_model_path

    with quiet_peft():
        from peft import get_peft_model

    config = AutoConfig.from_pretrained(resolve_model_path(model_path), num_labels=num_labels)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    peft_config = peft_lora_config(model, lora_cfg, head_modules(model, []))
    with quiet_peft():
        return get_peft_model(model, peft_config)


# --- measured GEMM throughput ---------------------------------------------------------------------


def time_matmul(a: Any, b: Any, seconds: float) -> float:
    """FLOP/s of `a @ b`, repeated for at least `seconds` after a short warm-up."""
    import torch

    cuda = a.is_cuda
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    for _ in range(3):
        torch.mm(a, b, out=out)
    if cuda:
        torch.cuda.synchronize()
    runs, started = 0, time.perf_counter()
    while True:
        for _ in range(5):
            torch.mm(a, b, out=out)
        runs += 5
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return flops * runs / elapsed


def measure_gemm(tokens: int, hidden: int, ffn: int, seconds_per_shape: float = 1.0) -> dict[str, Any]:
    """torch.mm throughput at a transformer layer's shapes: (tokens x hidden) @ (hidden x hidden) (Q, K, V,
    O), @ (hidden x ffn) and (tokens x ffn) @ (ffn x hidden) (the MLP); fp32 on CPU, bf16 on a GPU.

    `gemm_flops` is the layer mix (4 square, 1 up, 1 down) as one number: its FLOPs over its seconds.
    `hidden_x_3hidden` (Q, K, V fused into one matmul) is measured beside it, outside the mix.
    """
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(rows: int, cols: int) -> Any:
        return torch.randn(rows, cols, generator=generator).to(device=device, dtype=dtype)

    shapes = {
        "hidden_x_hidden": (tokens, hidden, hidden, 4),
        "hidden_x_ffn": (tokens, hidden, ffn, 1),
        "ffn_x_hidden": (tokens, ffn, hidden, 1),
        # not in the layer mix: Q, K and V fused into one matmul, the ceiling of that lever
        "hidden_x_3hidden": (tokens, hidden, 3 * hidden, 0),
    }
    per_shape, total_flops, total_seconds = {}, 0.0, 0.0
    for name, (m, k, n, count) in shapes.items():
        rate = time_matmul(randn(m, k), randn(k, n), seconds_per_shape)
        per_shape[name] = {"m": m, "k": k, "n": n, "gflops": rate / 1e9}
        flops = count * 2 * m * k * n
        total_flops += flops
        total_seconds += flops / rate
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "device": device.type,
        "threads": torch.get_num_threads(),
        "tokens": tokens,
        "shapes": per_shape,
        "gemm_flops": total_flops / total_seconds,
    }
