"""The optimizer and the learning-rate schedule: AdamW with parameter groups (no decay on biases and
norms, `train.head_lr` for the head), fused when it can run, and a warmup schedule from transformers;
and the two checks that keep a non-finite step from being taken (`all_finite`,
`nonfinite_reaches_gradients`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from scalelora.config import RunConfig
from scalelora.errors import UserError
from scalelora.models import HEAD_MODULES, quiet_peft


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases and norm weights (all 1-D tensors) get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def is_head_parameter(name: str) -> bool:
    return any(f"{h}." in name or name.startswith(h) for h in HEAD_MODULES)


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((is_head_parameter(name), no_decay(name, param)), []).append(param)
    param_groups = [
        {
            "params": params,
            "weight_decay": 0.0 if skip_decay else cfg.train.weight_decay,
            "lr": cfg.train.head_lr if (is_head and cfg.train.head_lr) else cfg.train.lr,
        }
        for (is_head, skip_decay), params in groups.items()
    ]
    if not param_groups:
        raise UserError("nothing to train: every parameter is frozen (check model.mode and model.train_head)")
    setting = cfg.train.fused_adamw
    params = [p for g in param_groups for p in g["params"]]
    possible = use_fused_adamw(params)
    fused = possible if setting == "auto" else bool(setting)
    if fused and not possible:
        devices = sorted({str(p.device) for p in params})
        raise UserError(
            f"train.fused_adamw=true needs every trainable tensor on one CUDA device or on the CPU "
            f"(they are on {', '.join(devices)}); set train.fused_adamw=auto or false"
        )
    return torch.optim.AdamW(param_groups, lr=cfg.train.lr, fused=fused or None)


def use_fused_adamw(params: Iterable[torch.nn.Parameter]) -> bool:
    """Whether torch's fused AdamW (one kernel for all tensors) can run: every trainable tensor is a
    float on one device, and that device is the CPU or CUDA.

    Ask only once `prepare` has placed the model: before that every parameter is on the CPU.
    """
    devices = {p.device for p in params}
    floats = all(p.is_floating_point() for p in params)
    return floats and len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, total_steps: int) -> Any:
    # transformers.optimization imports its trainer utilities, which import PEFT (and PEFT bitsandbytes)
    # when installed: a full fine-tune that never imported PEFT gets it here, quiet as in models
    with quiet_peft(cfg.model.load_in_8bit or cfg.model.load_in_4bit):
        from transformers import (
            get_constant_schedule_with_warmup,
            get_cosine_schedule_with_warmup,
            get_linear_schedule_with_warmup,
        )

    warmup = (
        cfg.train.warmup_steps
        if cfg.train.warmup_steps is not None
        else int(cfg.train.warmup_ratio * total_steps)
    )
    if cfg.train.scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    factory = (
        get_cosine_schedule_with_warmup
        if cfg.train.scheduler == "cosine"
        else get_linear_schedule_with_warmup
    )
    return factory(optimizer, warmup, total_steps)


# --- non-finite steps ----------------------------------------------------------------------------


def nonfinite_reaches_gradients(loss: torch.Tensor) -> torch.Tensor:
    """`loss` unchanged (times exactly 1) when finite; when not, a NaN whose gradients are all NaN.

    DeepSpeed steps inside `backward` and has one way to discard a step: its overflow check on the
    gradients. A loss can be NaN with finite gradients (a NaN term that does not depend on the
    weights); this makes sure the check sees it. No host sync: the factor is computed on the device.
    """
    factor = torch.ones_like(loss).masked_fill(~torch.isfinite(loss.detach()), float("nan"))
    return loss * factor


def all_finite(accelerator: Any, value: torch.Tensor) -> bool:
    """Whether `value` is finite on every rank (one all-reduce when there are several)."""
    bad = (~torch.isfinite(value)).any().float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return not bool(bad.item())
