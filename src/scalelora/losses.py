"""Training losses as pure functions of logits.

Every function returns SUMS over the valid examples of the batch (labels != IGNORE_INDEX); the
trainer divides them by totals over the whole accumulated global batch (`combine_loss`), so
micro-batching and sharding do not change the gradient:

    (1 - weight) * sum_i w_i * hard_i / sum_i w_i  +  weight * sum_i kd_i / N  (+ hidden_weight * sum_i mse_i / N)

where `weight` is distill.weight, w_i the class weight of example i's label (1 without class weights)
and N the example count.

Multi-label batches carry 2-D multi-hot float labels (one row per example, one column per label).
Their hard loss is binary cross-entropy (or the sigmoid focal loss) summed over labels per example,
class weights are per-label `pos_weight`s inside it, so w_i = 1 and sum_i w_i = N, and distillation
compares per-label sigmoid probabilities (`kd_sigmoid_sum`). A multi-label row with any label cell
equal to IGNORE_INDEX is ignored as a whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def valid_rows(labels: torch.Tensor) -> torch.Tensor:
    """Which examples count: 1-D class ids != IGNORE_INDEX, or 2-D multi-hot rows with no ignored cell."""
    if labels.dim() == 2:
        return (labels != IGNORE_INDEX).all(dim=-1)
    return labels != IGNORE_INDEX


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
    2-D (multi-label) labels go to `multi_label_loss_sum`.
    """
    if labels.dim() == 2:
        return multi_label_loss_sum(logits, labels, class_weights, focal_gamma, label_smoothing)
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


def multi_label_loss_sum(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
    focal_gamma: float | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i loss_i, N) for multi-hot `labels` of shape (N, K).

    loss_i = sum_k -[pw_k y_ik (1 - p_ik)^g log p_ik + (1 - y_ik) p_ik^g log(1 - p_ik)], p = sigmoid(logits),
    with y smoothed to y (1 - eps) + eps / 2 and g = `focal_gamma` (0 without: binary cross-entropy, the
    sigmoid focal loss of Lin et al. 2017 otherwise). `pos_weight` (per label, 1 without) weighs the
    positive term, as in `BCEWithLogitsLoss`; it is not an example weight, so the weight sum is N.
    """
    valid = valid_rows(labels)
    target = labels.float().clamp(min=0.0)  # ignored rows are masked below; keep their logs finite
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / 2
    z = logits.float()
    pos_term = -F.logsigmoid(z)  # -log p
    neg_term = -F.logsigmoid(-z)  # -log(1 - p)
    if focal_gamma is not None:
        p = torch.sigmoid(z)
        pos_term = pos_term * (1.0 - p).pow(focal_gamma)
        neg_term = neg_term * p.pow(focal_gamma)
    if pos_weight is not None:
        pos_term = pos_term * pos_weight.float()
    per_example = (target * pos_term + (1.0 - target) * neg_term).sum(dim=-1)
    return (per_example * valid).sum(), valid.sum().float()


def class_weight_sum(labels: torch.Tensor, class_weights: torch.Tensor | None) -> torch.Tensor:
    """sum_i w_i over the valid examples: the denominator of the weighted hard-label loss (N for
    multi-label labels, whose class weights act inside each example's loss as pos_weight)."""
    valid = valid_rows(labels)
    if class_weights is None or labels.dim() == 2:
        return valid.sum().float()
    return (class_weights[labels.clamp(min=0)].float() * valid).sum()


def combine_loss(
    hard_sum: torch.Tensor,
    weight_total: torch.Tensor,
    count_total: torch.Tensor,
    kd_sum: torch.Tensor | None = None,
    weight: float = 0.0,
    hidden_sum: torch.Tensor | None = None,
    hidden_weight: float = 0.0,
) -> torch.Tensor:
    """The objective of one micro-batch's share of the global batch (see the module docstring).

    `weight_total` and `count_total` are sum_i w_i and N over the whole global batch, so the shares of
    every micro-batch on every rank add up to the objective of the global batch.
    """
    hard = hard_sum / weight_total.clamp(min=1e-12)
    if kd_sum is None or weight == 0.0:
        loss = hard
    else:
        loss = (1.0 - weight) * hard + weight * kd_sum / count_total.clamp(min=1)
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
        per_example = per_example * valid_rows(labels)
    return per_example.sum() * (t * t)


def kd_sigmoid_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-label distillation: sum over examples of T^2 * sum_k KL(Bernoulli(p_k) || Bernoulli(q_k)),
    p = sigmoid(teacher/T), q = sigmoid(student/T): each label's probability distilled on its own.

    Its gradient in the student logit is T (q - p), as for `kd_kl_sum`.
    """
    t = float(temperature)
    s, tt = student_logits.float() / t, teacher_logits.float() / t
    p = torch.sigmoid(tt)
    # p log(p/q) + (1-p) log((1-p)/(1-q)), with every log from logsigmoid (stable for large logits)
    per_label = p * (F.logsigmoid(tt) - F.logsigmoid(s)) + (1.0 - p) * (F.logsigmoid(-tt) - F.logsigmoid(-s))
    per_example = per_label.sum(dim=-1)
    if labels is not None:
        per_example = per_example * valid_rows(labels)
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
        per_example = per_example * valid_rows(labels)
    return per_example.sum()


def count_valid(labels: torch.Tensor) -> torch.Tensor:
    """The number of valid examples (rows, for 2-D multi-label labels; never label cells)."""
    return valid_rows(labels).sum()
