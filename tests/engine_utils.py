"""Shared helpers for the engine, checkpoint and trainer tests: a tiny config, a batch, state snapshots."""

from __future__ import annotations

import copy

import torch

from adclr.config import TrainConfig, make_config
from adclr.schedules import StepSettings

CPU = torch.device("cpu")


def tiny_config(**overrides) -> TrainConfig:
    """The built-in preset shrunk to a few milliseconds per step on a CPU (``overrides`` win)."""
    values = dict(
        global_size=32,  # a 4 x 4 patch grid: the tests need no more than the preset's 6 x 6
        out_dim=32,
        head_hidden_dim=32,
        head_bottleneck_dim=8,
        local_crops_number=1,
        num_query=3,
        batch_size_per_gpu=4,
        precision="fp32",
        attn_backend="sdpa",
    )
    return make_config("builtin", **{**values, **overrides})


def batch(config: TrainConfig, batch_size: int = 4):
    """Random ``(crops, query_crops)`` shaped as ``config``'s augmentation makes them."""
    g, loc, p = config.data.global_size, config.data.local_size, config.model.patch_size
    crops = [torch.randn(batch_size, 3, g, g) for _ in range(2)]
    crops += [torch.randn(batch_size, 3, loc, loc) for _ in range(config.data.local_crops_number)]
    return crops, torch.randn(batch_size, config.data.num_query, 3, p, p)


SETTINGS = StepSettings(lr=1e-3, weight_decay=0.04, teacher_temp=0.04, momentum=0.99, freeze_last_layer=False)


def snapshot(state):
    """Deep copies of everything a step may change."""
    return {
        "grads": {n: p.grad.clone() for n, p in state.student.named_parameters() if p.grad is not None},
        "student": copy.deepcopy(state.student.state_dict()),
        "teacher": copy.deepcopy(state.teacher.state_dict()),
        "loss": copy.deepcopy(state.loss.state_dict()),
        "optimizer": copy.deepcopy(state.optimizer.state_dict()),
        "scaler": copy.deepcopy(state.scaler.state_dict()),
    }


def assert_same(a, b, path=""):
    """Exact equality of nested state dicts (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=path)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    else:
        assert a == b, path


# ---- An independent ADCLR objective: the paper's Eq. 6 (with DINO's multi-crop CLS term) written out ----


def _cross_entropy(target_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """H(p, softmax(logits)) = -sum_k p_k log softmax(logits)_k for one sample (1-D tensors)."""
    return -(target_probs * (logits - torch.logsumexp(logits, dim=0))).sum()


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max())
    return e / e.sum()


def reference_loss(
    student_cls,
    teacher_cls,
    student_query,
    teacher_query,
    *,
    center,
    query_center,
    teacher_temp: float,
    student_temp: float = 0.1,
    lambda_query: float = 0.5,
):
    """``(total, cls, query)`` in float64, one sample, one pair and one query at a time (no code under test).

    ``student_cls`` ``[crops, B, K]`` (2 global views first), ``teacher_cls`` ``[2, B, K]``, ``*_query``
    ``[2, B, Q, K]`` or None, ``center`` / ``query_center`` ``[K]``. CLS: the mean over every (teacher
    view t, student crop v != t) pair of the batch mean of ``H(teacher t, student v)``. Queries: ``lambda/Q``
    times the sum over the Q queries of ``H(teacher query i in view B, student query i in view A)``,
    averaged over ``(A, B) = (1, 2), (2, 1)`` and the batch. Teacher rows are centred, then sharpened.
    Differentiable with respect to the student's outputs.
    """
    student_cls, teacher_cls, center = (t.double() for t in (student_cls, teacher_cls, center))
    crops, batch_size = student_cls.shape[:2]
    pair_losses = []
    for t in range(2):
        for v in range(crops):
            if v == t:
                continue
            per_sample = [
                _cross_entropy(
                    _softmax((teacher_cls[t, b] - center).detach() / teacher_temp), student_cls[v, b] / student_temp
                )
                for b in range(batch_size)
            ]
            pair_losses.append(sum(per_sample) / batch_size)
    cls = sum(pair_losses) / len(pair_losses)
    if student_query is None or lambda_query == 0:
        query = cls.new_zeros(())
    else:
        student_query, teacher_query, query_center = (t.double() for t in (student_query, teacher_query, query_center))
        num_query = student_query.shape[2]
        directions = []
        for a, b_view in ((0, 1), (1, 0)):
            per_sample = []
            for b in range(batch_size):
                terms = [
                    _cross_entropy(
                        _softmax((teacher_query[b_view, b, i] - query_center).detach() / teacher_temp),
                        student_query[a, b, i] / student_temp,
                    )
                    for i in range(num_query)
                ]
                per_sample.append(sum(terms) / num_query)
            directions.append(sum(per_sample) / batch_size)
        query = (directions[0] + directions[1]) / 2
    return cls + lambda_query * query, cls, query


def reference_outputs(network, crops, query_crops):
    """``(cls [crops, B, K], queries [2, B, Q, K] or None)``: each crop through the backbone and head on its own.

    Query crops go with each global view (the first two crops) and never with a local one; query tokens
    use the separate query head when the network has one. No multi-crop grouping is involved.
    """
    cls, queries = [], []
    for view, crop in enumerate(crops):
        out = network.backbone(crop, query_crops if view < 2 else None)
        cls.append(network.head(out.cls))
        if view < 2 and query_crops is not None:
            queries.append((network.query_head or network.head)(out.queries))
    return torch.stack(cls), (torch.stack(queries) if queries else None)


def reference_step_loss(student, teacher, crops, query_crops, center, query_center, teacher_temp, lambda_query):
    """``(loss terms, teacher_cls, teacher_query)`` of one step through the reference networks: the teacher
    (no graph) on the two global crops, the student on every crop, the loop loss of paper Eq. 6."""
    with torch.no_grad():
        teacher_cls, teacher_query = reference_outputs(teacher, crops[:2], query_crops)
    student_cls, student_query = reference_outputs(student, crops, query_crops)
    terms = reference_loss(
        student_cls,
        teacher_cls,
        student_query,
        teacher_query,
        center=center,
        query_center=query_center,
        teacher_temp=teacher_temp,
        lambda_query=lambda_query,
    )
    return terms, teacher_cls, teacher_query
