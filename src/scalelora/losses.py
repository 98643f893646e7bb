"""Training losses as pure functions of logits.

Every function returns SUMS over the valid examples of the batch (labels != IGNORE_INDEX); the
trainer divides them by totals over the whole accumulated global batch (`combine_loss`), so
micro-batching and sharding do not change the gradient:

    (1 - alpha) * sum_i w_i * hard_i / sum_i w_i  +  alpha * sum_i kd_i / N  (+ hidden_weight * sum_i mse_i / N)

where w_i is the class weight of example i's label (1 without class weights) and N the example count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def hard_label_loss_sum(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    focal_gamma: float | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i w_i * loss_i, sum_i w_i) over the valid examples.

    loss_i is cross-entropy against the (optionally smoothed) target q, or with `focal_gamma` set the
    focal loss -sum_c q_c (1 - p_c)^gamma log p_c, which is cross-entropy at gamma = 0. w_i is
    `class_weights[label_i]` (1 without weights); weights never apply to distillation terms.
    """
    valid = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    num_classes = log_probs.shape[-1]
    target = F.one_hot(safe, num_classes).float()
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
    per_class = -target * log_probs
    if focal_gamma is not None:
        per_class = per_class * (1.0 - log_probs.exp()).pow(focal_gamma)
    weights = class_weights[safe].float() if class_weights is not None else torch.ones_like(log_probs[:, 0])
    weights = weights * valid
    return (per_class.sum(dim=-1) * weights).sum(), weights.sum()


def class_weight_sum(labels: torch.Tensor, class_weights: torch.Tensor | None) -> torch.Tensor:
    """sum_i w_i over the valid examples: the denominator of the weighted hard-label loss."""
    valid = labels != IGNORE_INDEX
    if class_weights is None:
        return valid.sum().float()
    return (class_weights[labels.clamp(min=0)].float() * valid).sum()


def combine_loss(
    hard_sum: torch.Tensor,
    weight_total: torch.Tensor,
    count_total: torch.Tensor,
    kd_sum: torch.Tensor | None = None,
    alpha: float = 0.0,
    hidden_sum: torch.Tensor | None = None,
    hidden_weight: float = 0.0,
) -> torch.Tensor:
    """The objective of one micro-batch's share of the global batch (see the module docstring).

    `weight_total` and `count_total` are sum_i w_i and N over the whole global batch, so the shares of
    every micro-batch on every rank add up to the objective of the global batch.
    """
    hard = hard_sum / weight_total.clamp(min=1e-12)
    if kd_sum is None or alpha == 0.0:
        loss = hard
    else:
        loss = (1.0 - alpha) * hard + alpha * kd_sum / count_total.clamp(min=1)
    if hidden_sum is not None and hidden_weight:
        loss = loss + hidden_weight * hidden_sum / count_total.clamp(min=1)
    return loss


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


def count_valid(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).sum()
