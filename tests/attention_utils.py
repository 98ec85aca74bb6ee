"""Shared helpers for the attention tests: float64 ground truth, error measures, input makers, the
tuned-table check."""

from __future__ import annotations

import json
import os

import torch

from adclr.kernels import LAYOUT_NAMES, AttentionLayout, plans, reference_attention
from bench.common import ERROR_FLOOR  # the tuner's accuracy gate uses the same floor

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU runs the kernels in the interpreter
RULES = list(LAYOUT_NAMES)  # every query-key rule, plus the bidirectional ablation


def layout_for(rule: str, R: int, Q: int, P: int) -> AttentionLayout:
    """The layout of ``rule`` (one of ``RULES``) with R raw tokens (P of them prefix) and Q queries."""
    return AttentionLayout.named(rule, R, Q, P)


def make_qkv(batch, heads, seq_len, head_dim, dtype, device, strided=False):
    """Random q, k, v ``[B, H, L, D]``; ``strided`` gives sequence-major, padded, non-contiguous views."""
    if not strided:
        return [torch.randn(batch, heads, seq_len, head_dim, dtype=dtype, device=device) for _ in range(3)]
    base = torch.randn(batch, seq_len, heads, 3 * head_dim + 5, dtype=dtype, device=device)
    return [base[..., i * head_dim : (i + 1) * head_dim].transpose(1, 2) for i in range(3)]


def reference_with_grads(q, k, v, do, layout: AttentionLayout, scale: float, dtype=torch.float64):
    """Reference output and (dq, dk, dv) computed in ``dtype`` (float64: ground truth)."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = reference_attention(q, k, v, layout, scale)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    return out.detach(), grads


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max absolute difference in float64; NaN anywhere (an unwritten element) gives inf."""
    diff = (actual.double() - expected.double()).abs()
    return float("inf") if not torch.isfinite(diff).all() else diff.max().item()


def assert_close_to_truth(name, actual, truth, pytorch_same_dtype, dtype):
    """flash-attention's criterion: error vs float64 at most 2x PyTorch's own error in ``dtype``."""
    ours = max_error(actual, truth)
    theirs = max_error(pytorch_same_dtype, truth)
    bound = 2 * theirs + ERROR_FLOOR[dtype]
    assert ours <= bound, f"{name}: error {ours:.3e} > 2 x PyTorch's {theirs:.3e} + {ERROR_FLOOR[dtype]:.0e}"


def check_table_file(path: str) -> None:
    """Assert that the tuned table at ``path`` is one the loader takes in full: the schema, the stamp
    (device, torch, triton, date), a file named after its device, every entry valid and each key once."""
    with open(path) as f:
        data = json.load(f)
    assert isinstance(data, dict) and data.get("schema") == plans.TABLE_SCHEMA, (
        f"{path}: schema is not {plans.TABLE_SCHEMA}"
    )
    for field in ("device", "torch", "triton", "date"):
        assert isinstance(data.get(field), str), f"{path}: no {field} stamp"
    expected_name = plans.device_slug(data["device"]) + ".json"
    assert os.path.basename(path) == expected_name, f"{path}: not named after its device ({expected_name})"
    assert isinstance(data.get("entries"), list) and data["entries"], f"{path}: no entries"
    keys = []
    for i, obj in enumerate(data["entries"]):
        try:
            key, _ = plans.parse_entry(obj)
        except (ValueError, TypeError) as error:
            raise AssertionError(f"{path}: entry {i}: {error}") from error
        keys.append(key)
    assert len(set(keys)) == len(keys), f"{path}: a key appears twice"
