"""The ADCLR loss: a hand-computed value, no teacher gradient, lambda = 0, and the centres."""

import math

import torch

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
