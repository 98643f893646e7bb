"""Training losses as pure functions of logits.

Every function returns a SUM over the valid examples of the batch (labels != IGNORE_INDEX); the
trainer divides by the number of valid examples in the whole accumulated global batch, so
micro-batching and sharding do not change the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of per-example cross-entropy; examples labelled IGNORE_INDEX contribute nothing."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def kd_kl_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over examples of T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    The T^2 factor keeps the gradient scale independent of T (Hinton et al. 2015).
    """
    t = float(temperature)
    student_log_probs = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_example = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=-1)
    if labels is not None:
        per_example = per_example * (labels != IGNORE_INDEX)
    return per_example.sum() * (t * t)


def hidden_mse_sum(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum over examples of the mean squared difference of pooled hidden states."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"hidden sizes differ: student {tuple(student_hidden.shape)} vs teacher {tuple(teacher_hidden.shape)}"
        )
    per_example = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(dim=-1)
    if labels is not None:
        per_example = per_example * (labels != IGNORE_INDEX)
    return per_example.sum()


def distillation_loss_sum(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    weight: float,
    temperature: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1 - alpha) * CE + alpha * T^2 * KL, summed over examples; also returns the detached parts.

    With teacher_logits None (or alpha = 0) this is exactly the cross-entropy sum.
    """
    ce = cross_entropy_sum(student_logits, labels)
    if teacher_logits is None or weight == 0.0:
        return ce, {"ce": ce.detach()}
    kd = kd_kl_sum(student_logits, teacher_logits, temperature, labels)
    total = (1.0 - weight) * ce + weight * kd
    return total, {"ce": ce.detach(), "kd": kd.detach()}


def count_valid(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).sum()
