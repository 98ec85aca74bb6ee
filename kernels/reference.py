"""Explicit PyTorch ADCLR attention: scores, mask, softmax, weighted sum. The tests' ground truth."""

from __future__ import annotations

import torch

from .layout import AttentionLayout


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, scale: float
) -> torch.Tensor:
    """Attention over ``[B, H, L, D]`` in the inputs' own dtype (use float64 for ground truth)."""
    return reference_probabilities(q, k, layout, scale) @ v


def reference_probabilities(q: torch.Tensor, k: torch.Tensor, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """Softmax attention weights ``[B, H, L, L]``; exactly zero on keys the layout forbids."""
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~layout.dense_mask(q.device), float("-inf"))
    return scores.softmax(dim=-1)
