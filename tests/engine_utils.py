"""Shared helpers for the engine, checkpoint and trainer tests: a tiny config, a batch, state snapshots."""

from __future__ import annotations

import copy

import torch

from adclr import engine
from adclr.config import TrainConfig, make_config

CPU = torch.device("cpu")


def tiny_config(**overrides) -> TrainConfig:
    """The built-in preset shrunk to a few milliseconds per step on a CPU (``overrides`` win)."""
    values = dict(
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


SETTINGS = engine.StepSettings(lr=1e-3, weight_decay=0.04, teacher_temp=0.04, momentum=0.99, freeze_last_layer=False)


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
