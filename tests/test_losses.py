"""The training losses as pure functions, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from scalelora.losses import (
    IGNORE_INDEX,
    class_weight_sum,
    combine_loss,
    count_valid,
    hard_label_loss_sum,
    hidden_mse_sum,
    kd_kl_sum,
    kd_sigmoid_sum,
)


def softmax(xs: list[float]) -> list[float]:
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def kl_by_hand(teacher: list[float], student: list[float], t: float) -> float:
    """T^2 * sum_i p_i (log p_i - log q_i), p = softmax(teacher/T), q = softmax(student/T)."""
    p = softmax([x / t for x in teacher])
    q = softmax([x / t for x in student])
    return t * t * sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


STUDENT = torch.tensor(
    [
        [1.0, 0.0],
        [
            0.0,
            2.0,
        ],
        [3.0, -1.0],
    ]
)
TEACHER = torch.tensor([[0.0, 1.0], [0.5, 0.5], [2.0, 0.0]])
LABELS = torch.tensor([0, 1, 1])


def distillation_loss(student, labels, teacher, kd_weight, t):
    """The objective of one batch on its own: (1 - w) CE / N + w KD / N (w: distill.weight), and the sums."""
    hard, weight = hard_label_loss_sum(student, labels)
    kd = kd_kl_sum(student, teacher, t, labels) if teacher is not None else None
    return combine_loss(hard, weight, count_valid(labels).float(), kd, kd_weight), {"ce": hard, "kd": kd}


def test_cross_entropy_is_a_sum_over_examples():
    # -log softmax: log(1 + e^-1), log(1 + e^-2), log(1 + e^4)
    expected = math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2)) + math.log(1 + math.exp(4))
    hard, weight = hard_label_loss_sum(STUDENT, LABELS)
    assert float(hard) == pytest.approx(expected, rel=1e-6) and float(weight) == 3


# per-example cross-entropy of STUDENT/LABELS: log(1 + e^-1), log(1 + e^-2), log(1 + e^4)
CE = [math.log(1 + math.exp(-1)), math.log(1 + math.exp(-2)), math.log(1 + math.exp(4))]


def test_class_weights_weight_each_example_by_its_label():
    weights = torch.tensor([1.0, 3.0])  # label 0 weighs 1, label 1 weighs 3
    hard, weight = hard_label_loss_sum(STUDENT, LABELS, weights)
    assert float(hard) == pytest.approx(1 * CE[0] + 3 * CE[1] + 3 * CE[2], rel=1e-6)
    assert float(weight) == 7 and float(class_weight_sum(LABELS, weights)) == 7
    # the objective: sum w_i CE_i / sum w_i
    loss = combine_loss(hard, weight, count_valid(LABELS).float())
    assert float(loss) == pytest.approx((CE[0] + 3 * CE[1] + 3 * CE[2]) / 7, rel=1e-6)


def test_focal_loss_matches_the_formula_and_is_cross_entropy_at_gamma_zero():
    gamma = 2.0
    expected = 0.0
    for logits, y in zip(STUDENT.tolist(), LABELS.tolist()):
        p = softmax(logits)[y]
        expected += -((1 - p) ** gamma) * math.log(p)
    hard, _ = hard_label_loss_sum(STUDENT, LABELS, focal_gamma=gamma)
    assert float(hard) == pytest.approx(expected, rel=1e-6)
    assert float(hard_label_loss_sum(STUDENT, LABELS, focal_gamma=0.0)[0]) == pytest.approx(sum(CE), rel=1e-6)
    # focal down-weights the easy example (0: p = 0.73) far more than the hard one (2: p = 0.018)
    per_example = [
        float(hard_label_loss_sum(STUDENT[i : i + 1], LABELS[i : i + 1], focal_gamma=gamma)[0])
        for i in range(3)
    ]
    assert per_example[0] / CE[0] < 0.1 and per_example[2] / CE[2] > 0.9


def test_label_smoothing_spreads_the_target():
    eps = 0.1
    expected = 0.0
    for logits, y in zip(STUDENT.tolist(), LABELS.tolist()):
        logp = [math.log(p) for p in softmax(logits)]
        target = [eps / 2 + (1 - eps) * (c == y) for c in range(2)]
        expected += -sum(q * lp for q, lp in zip(target, logp))
    assert float(hard_label_loss_sum(STUDENT, LABELS, label_smoothing=eps)[0]) == pytest.approx(
        expected, rel=1e-6
    )
    ref = torch.nn.functional.cross_entropy(STUDENT, LABELS, reduction="sum", label_smoothing=eps)
    assert float(hard_label_loss_sum(STUDENT, LABELS, label_smoothing=eps)[0]) == pytest.approx(
        float(ref), rel=1e-6
    )


def test_weights_apply_to_the_hard_labels_only_and_kd_is_divided_by_the_example_count():
    weights = torch.tensor([1.0, 3.0])
    hard, weight = hard_label_loss_sum(STUDENT, LABELS, weights)
    kd = kd_kl_sum(STUDENT, TEACHER, 2.0, LABELS)
    loss = combine_loss(hard, weight, count_valid(LABELS).float(), kd, 0.4)
    assert float(loss) == pytest.approx(0.6 * float(hard) / 7 + 0.4 * float(kd) / 3, rel=1e-6)


def test_kd_at_temperature_two_matches_the_closed_form():
    # example 0 by hand: p = softmax([0, .5]), q = softmax([.5, 0]) = reversed p, so
    # KL = (p1 - p0) * 0.5 and T^2 * KL = 4 * 0.5 * tanh(0.25)
    first = 4 * 0.5 * math.tanh(0.25)
    assert kl_by_hand([0.0, 1.0], [1.0, 0.0], 2.0) == pytest.approx(first)
    assert float(kd_kl_sum(STUDENT[:1], TEACHER[:1], 2.0)) == pytest.approx(first, rel=1e-6)
    total = sum(kl_by_hand(t.tolist(), s.tolist(), 2.0) for s, t in zip(STUDENT, TEACHER))
    assert float(kd_kl_sum(STUDENT, TEACHER, 2.0)) == pytest.approx(total, rel=1e-6)


def test_kd_is_zero_when_student_equals_teacher_and_scales_with_t_squared():
    assert float(kd_kl_sum(TEACHER, TEACHER, 3.0)) == pytest.approx(0.0, abs=1e-7)
    t1 = sum(kl_by_hand(t.tolist(), s.tolist(), 1.0) for s, t in zip(STUDENT, TEACHER))
    assert float(kd_kl_sum(STUDENT, TEACHER, 1.0)) == pytest.approx(t1, rel=1e-6)
    # logits multiplied by T give the T = 1 distributions again, so what is left is the T^2 factor
    for t in (0.5, 2.0, 3.0):
        assert float(kd_kl_sum(STUDENT * t, TEACHER * t, t)) == pytest.approx(t * t * t1, rel=1e-6), t


@pytest.mark.parametrize("kd_weight", [0.0, 0.3, 1.0])
def test_distillation_mixes_ce_and_kd_with_the_distill_weight(kd_weight):
    t = 2.0
    ce = sum(-math.log(softmax(s.tolist())[y]) for s, y in zip(STUDENT, LABELS.tolist()))
    kd = sum(kl_by_hand(tt.tolist(), s.tolist(), t) for s, tt in zip(STUDENT, TEACHER))
    loss, parts = distillation_loss(STUDENT, LABELS, TEACHER, kd_weight, t)
    assert float(loss) == pytest.approx(((1 - kd_weight) * ce + kd_weight * kd) / 3, rel=1e-6)
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-6)
    if kd_weight == 0.0:
        # a weight of 0 is exactly the cross-entropy: the same number, bit for bit, as without a teacher
        assert torch.equal(loss, distillation_loss(STUDENT, LABELS, None, 0.5, t)[0])
    else:
        assert float(parts["kd"]) == pytest.approx(kd, rel=1e-6)


def test_ignored_examples_contribute_nothing():
    labels = torch.tensor([0, IGNORE_INDEX, 1])
    kept = [0, 2]
    loss, parts = distillation_loss(STUDENT, labels, TEACHER, 0.5, 2.0)
    ref, ref_parts = distillation_loss(STUDENT[kept], LABELS[kept], TEACHER[kept], 0.5, 2.0)
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    assert float(parts["kd"]) == pytest.approx(float(ref_parts["kd"]), rel=1e-6)
    assert int(count_valid(labels)) == 2
    hidden_s, hidden_t = torch.ones(3, 4), torch.zeros(3, 4)
    hidden_s[1] = 100.0  # the ignored example's huge error must not count
    assert float(hidden_mse_sum(hidden_s, hidden_t, labels)) == pytest.approx(2.0)


def test_hidden_mse_needs_matching_sizes():
    assert float(hidden_mse_sum(torch.full((2, 3), 2.0), torch.zeros(2, 3))) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="hidden sizes differ"):
        hidden_mse_sum(torch.zeros(2, 3), torch.zeros(2, 4))


def test_kd_gradient_is_student_minus_teacher_probs_times_t():
    # d/dz [T^2 KL(p || softmax(z/T))] = T (softmax(z/T) - p): the T^2 factor keeps the scale
    student = STUDENT[:1].clone().requires_grad_(True)
    kd_kl_sum(student, TEACHER[:1], 2.0).backward()
    q = torch.softmax(STUDENT[:1] / 2, -1)
    p = torch.softmax(TEACHER[:1] / 2, -1)
    torch.testing.assert_close(student.grad, 2.0 * (q - p))


# --- multi-label: 2-D multi-hot labels ------------------------------------------------------------

ML_LOGITS = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 1.5, -2.0]])
ML_LABELS = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def bce_by_hand(logits, labels, pos_weight=None, gamma=0.0, eps=0.0) -> list[float]:
    """Per example: sum_k -[pw y (1-p)^g log p + (1-y) p^g log(1-p)], y smoothed to y(1-eps)+eps/2."""
    out = []
    for row, ys in zip(logits.tolist(), labels.tolist()):
        total = 0.0
        for k, (z, y) in enumerate(zip(row, ys)):
            p, y = sig(z), y * (1 - eps) + eps / 2
            pw = pos_weight[k] if pos_weight is not None else 1.0
            total += -(pw * y * (1 - p) ** gamma * math.log(p) + (1 - y) * p**gamma * math.log(1 - p))
        out.append(total)
    return out


def test_multi_label_loss_is_bce_summed_over_labels_and_divided_by_examples():
    hard, weight = hard_label_loss_sum(ML_LOGITS, ML_LABELS)
    assert float(hard) == pytest.approx(sum(bce_by_hand(ML_LOGITS, ML_LABELS)), rel=1e-6)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(ML_LOGITS, ML_LABELS, reduction="sum")
    assert float(hard) == pytest.approx(float(ref), rel=1e-6)
    # the weight sum and the example count are rows, never label cells (6 here)
    assert float(weight) == 2 and int(count_valid(ML_LABELS)) == 2
    assert float(class_weight_sum(ML_LABELS, torch.tensor([1.0, 5.0, 9.0]))) == 2
    loss = combine_loss(hard, weight, count_valid(ML_LABELS).float())
    assert float(loss) == pytest.approx(sum(bce_by_hand(ML_LOGITS, ML_LABELS)) / 2, rel=1e-6)


def test_multi_label_class_weights_are_pos_weights():
    pos_weight = [1.0, 4.0, 0.5]
    hard, weight = hard_label_loss_sum(ML_LOGITS, ML_LABELS, torch.tensor(pos_weight))
    assert float(hard) == pytest.approx(sum(bce_by_hand(ML_LOGITS, ML_LABELS, pos_weight)), rel=1e-6)
    ref = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight), reduction="sum")(
        ML_LOGITS, ML_LABELS
    )
    assert float(hard) == pytest.approx(float(ref), rel=1e-6) and float(weight) == 2


def test_multi_label_focal_and_smoothing_match_the_formula():
    for gamma, eps in ((2.0, 0.0), (0.0, 0.1), (1.5, 0.2)):
        hard, _ = hard_label_loss_sum(ML_LOGITS, ML_LABELS, focal_gamma=gamma, label_smoothing=eps)
        expected = sum(bce_by_hand(ML_LOGITS, ML_LABELS, gamma=gamma, eps=eps))
        assert float(hard) == pytest.approx(expected, rel=1e-6), (gamma, eps)
    # gamma 0 is plain BCE
    assert float(hard_label_loss_sum(ML_LOGITS, ML_LABELS, focal_gamma=0.0)[0]) == pytest.approx(
        float(hard_label_loss_sum(ML_LOGITS, ML_LABELS)[0]), rel=1e-6
    )


def test_an_ignored_multi_label_row_contributes_nothing():
    labels = torch.cat([ML_LABELS, torch.full((1, 3), float(IGNORE_INDEX))])
    logits = torch.cat([ML_LOGITS, torch.tensor([[50.0, -50.0, 9.0]])])
    hard, weight = hard_label_loss_sum(logits, labels)
    assert float(weight) == 2 and int(count_valid(labels)) == 2
    assert float(hard) == pytest.approx(float(hard_label_loss_sum(ML_LOGITS, ML_LABELS)[0]), rel=1e-6)
    assert float(kd_sigmoid_sum(logits, logits + 1, 2.0, labels)) == pytest.approx(
        float(kd_sigmoid_sum(ML_LOGITS, ML_LOGITS + 1, 2.0)), rel=1e-6
    )


def test_kd_sigmoid_is_t_squared_per_label_binary_kl():
    teacher = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.5, -1.0]])
    t = 2.0
    expected = 0.0
    for srow, trow in zip(ML_LOGITS.tolist(), teacher.tolist()):
        for s, tt in zip(srow, trow):
            p, q = sig(tt / t), sig(s / t)
            expected += t * t * (p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))
    assert float(kd_sigmoid_sum(ML_LOGITS, teacher, t)) == pytest.approx(expected, rel=1e-6)
    assert float(kd_sigmoid_sum(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-7)
    # the gradient in the student logits is T (q - p), as for the softmax KD
    student = ML_LOGITS.clone().requires_grad_(True)
    kd_sigmoid_sum(student, teacher, t).backward()
    torch.testing.assert_close(student.grad, t * (torch.sigmoid(ML_LOGITS / t) - torch.sigmoid(teacher / t)))
