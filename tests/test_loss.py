"""The ADCLR loss (``adclr.loss.ADCLRLoss``, the reference the fused path is checked against).

Against a hand-computed value (batch 1, Q = 1) and, with batch > 1, Q > 1, distinct views, local crops,
temperatures other than 1 and non-zero centres, against an independent loop implementation of the
paper's Eq. 6 (values) and the closed-form gradient ``(softmax(s / tau_s) - p_t) / tau_s`` (gradients).
"""

import math

import pytest
import torch
from engine_utils import reference_loss

from adclr.loss import ADCLRLoss


def test_matches_hand_computed_value():
    loss_fn = ADCLRLoss(out_dim=2, num_crops=2, student_temp=1.0, lambda_query=0.5)
    s_cls = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # student: view 1, view 2
    t_cls = torch.tensor([[0.0, 0.0], [2.0, 0.0]])  # teacher: view 1, view 2
    s_q = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]]])  # [2 views, B=1, Q=1, K=2]
    t_q = torch.tensor([[[[0.0, 1.0]]], [[[0.0, 0.0]]]])
    terms = loss_fn(s_cls, t_cls, s_q, t_q, teacher_temp=1.0)

    def h(p, logits):
        logp = [x - math.log(sum(math.exp(y) for y in logits)) for x in logits]
        return -sum(a * b for a, b in zip(p, logp))

    def softmax(z):
        e = [math.exp(x) for x in z]
        return [x / sum(e) for x in e]

    # CLS: teacher view 1 vs student view 2, teacher view 2 vs student view 1.
    cls = (h(softmax([0, 0]), [1, 0]) + h(softmax([2, 0]), [0, 1])) / 2
    # Queries: teacher view 2 vs student view 1, teacher view 1 vs student view 2.
    query = (h(softmax([0, 0]), [1, 0]) + h(softmax([0, 1]), [0, 0])) / 2
    assert abs(terms.cls.item() - cls) < 1e-6
    assert abs(terms.query.item() - query) < 1e-6
    assert abs(terms.total.item() - (cls + 0.5 * query)) < 1e-6


def random_outputs(B=4, Q=3, K=16, crops=4):
    return (
        torch.randn(crops * B, K, requires_grad=True),
        torch.randn(2 * B, K, requires_grad=True),
        torch.randn(2, B, Q, K, requires_grad=True),
        torch.randn(2, B, Q, K, requires_grad=True),
    )


def test_no_gradient_reaches_the_teacher():
    s_cls, t_cls, s_q, t_q = random_outputs()
    ADCLRLoss(16, 4)(s_cls, t_cls, s_q, t_q, 0.04).total.backward()
    assert t_cls.grad is None and t_q.grad is None
    assert s_cls.grad.abs().sum() > 0 and s_q.grad.abs().sum() > 0


def test_lambda_zero_removes_the_query_term():
    s_cls, t_cls, s_q, t_q = random_outputs()
    terms = ADCLRLoss(16, 4, lambda_query=0.0)(s_cls, t_cls, s_q, t_q, 0.04)
    terms.total.backward()
    assert s_q.grad is None and torch.equal(terms.total, terms.cls)


def test_centres_move_as_specified():
    loss_fn = ADCLRLoss(16, 4, center_momentum=0.9)
    loss_fn.center.fill_(1.0)
    s_cls, t_cls, s_q, t_q = random_outputs()
    loss_fn(s_cls, t_cls, s_q, t_q, 0.04)
    expected = 0.9 * 1.0 + 0.1 * t_cls.detach().mean(0, keepdim=True)
    assert torch.allclose(loss_fn.center, expected, atol=1e-6)
    assert torch.allclose(loss_fn.query_center, 0.1 * t_q.detach().reshape(-1, 16).mean(0, keepdim=True), atol=1e-6)


def test_query_term_pairs_views_crosswise():
    """Changing the teacher's queries of view 1 moves only the student-view-2 term, never view 1's."""
    s_cls, t_cls, s_q, t_q = random_outputs(crops=2)
    s_q = s_q.detach().requires_grad_()
    ADCLRLoss(16, 2)(s_cls, t_cls, s_q, t_q, 0.1).query.backward()
    before = s_q.grad.clone()
    s_q.grad = None
    t_changed = t_q.detach().clone()
    t_changed[0] = torch.randn_like(t_changed[0])
    ADCLRLoss(16, 2)(s_cls, t_cls, s_q, t_changed, 0.1).query.backward()
    assert torch.equal(s_q.grad[0], before[0])
    assert not torch.allclose(s_q.grad[1], before[1])


# (batch, Q, crops, teacher temp, student temp, lambda): every case has distinct views and non-zero centres.
CASES = [(3, 4, 4, 0.07, 0.1, 0.5), (2, 5, 2, 0.04, 0.25, 1.5), (4, 2, 3, 0.5, 0.1, 0.3), (1, 1, 2, 0.2, 0.3, 0.5)]


def _loss_case(B, Q, crops, K=24):
    """Random student/teacher outputs of every crop (each view its own tensor) and random centres."""
    return dict(
        student_cls=torch.randn(crops, B, K, dtype=torch.float64) * 2,
        teacher_cls=torch.randn(2, B, K, dtype=torch.float64),
        student_query=torch.randn(2, B, Q, K, dtype=torch.float64) * 2,
        teacher_query=torch.randn(2, B, Q, K, dtype=torch.float64),
        center=torch.randn(K, dtype=torch.float64) * 0.3,
        query_center=torch.randn(K, dtype=torch.float64) * 0.3,
    )


@pytest.mark.parametrize("B, Q, crops, teacher_temp, student_temp, lam", CASES)
def test_values_and_gradients_match_the_independent_formula(B, Q, crops, teacher_temp, student_temp, lam):
    case = _loss_case(B, Q, crops)
    K = case["center"].numel()
    loss_fn = ADCLRLoss(K, crops, student_temp=student_temp, lambda_query=lam)
    loss_fn.center.copy_(case["center"])
    loss_fn.query_center.copy_(case["query_center"])
    s_cls = case["student_cls"].flatten(0, 1).float().requires_grad_()  # [crops * B, K], crop-major
    s_q = case["student_query"].float().requires_grad_()
    terms = loss_fn(s_cls, case["teacher_cls"].flatten(0, 1).float(), s_q, case["teacher_query"].float(), teacher_temp)
    total, cls, query = reference_loss(**case, teacher_temp=teacher_temp, student_temp=student_temp, lambda_query=lam)
    for actual, expected in zip((terms.total, terms.cls, terms.query), (total, cls, query)):
        torch.testing.assert_close(actual.double(), expected, rtol=2e-6, atol=0)  # float32 arithmetic

    # d/ds H(p, softmax(s / tau_s)) = (softmax(s / tau_s) - p) / tau_s, scaled by each term's weight.
    terms.total.backward()
    p_cls = torch.softmax((case["teacher_cls"] - case["center"]) / teacher_temp, dim=-1)
    q_student = torch.softmax(case["student_cls"] / student_temp, dim=-1)
    pairs = 2 * (crops - 1)
    expected_cls = torch.stack(
        [sum(q_student[v] - p_cls[t] for t in range(2) if t != v) / (student_temp * pairs * B) for v in range(crops)]
    )
    p_q = torch.softmax((case["teacher_query"] - case["query_center"]) / teacher_temp, dim=-1)
    q_q = torch.softmax(case["student_query"] / student_temp, dim=-1)
    expected_q = lam * (q_q - p_q.flip(0)) / (student_temp * 2 * B * Q)  # view A is taught by view B
    scale = max(expected_cls.abs().max(), expected_q.abs().max())
    torch.testing.assert_close(s_cls.grad.view(crops, B, K).double(), expected_cls, rtol=1e-4, atol=1e-6 * scale)
    torch.testing.assert_close(s_q.grad.double(), expected_q, rtol=1e-4, atol=1e-6 * scale)


def test_centres_are_used_and_then_updated_from_this_batch():
    """The loss subtracts the centres it holds before the update; then both move towards this batch's means."""
    B, Q, crops, K = 3, 4, 3, 24
    case = _loss_case(B, Q, crops, K)
    loss_fn = ADCLRLoss(K, crops, center_momentum=0.8)
    loss_fn.center.copy_(case["center"])
    loss_fn.query_center.copy_(case["query_center"])
    terms = loss_fn(
        case["student_cls"].flatten(0, 1).float(),
        case["teacher_cls"].flatten(0, 1).float(),
        case["student_query"].float(),
        case["teacher_query"].float(),
        0.04,
    )
    expected = reference_loss(**case, teacher_temp=0.04)
    uncentred = reference_loss(
        **{**case, "center": 0 * case["center"], "query_center": 0 * case["center"]}, teacher_temp=0.04
    )
    torch.testing.assert_close(terms.total.double(), expected[0], rtol=2e-6, atol=0)
    assert abs(terms.cls - uncentred[1]) > 1e-3 and abs(terms.query - uncentred[2]) > 1e-3
    cls_mean = case["teacher_cls"].mean(dim=(0, 1))
    query_mean = case["teacher_query"].mean(dim=(0, 1, 2))
    torch.testing.assert_close(loss_fn.center[0].double(), 0.8 * case["center"] + 0.2 * cls_mean, rtol=0, atol=1e-6)
    expected_query_center = 0.8 * case["query_center"] + 0.2 * query_mean
    torch.testing.assert_close(loss_fn.query_center[0].double(), expected_query_center, rtol=0, atol=1e-6)
