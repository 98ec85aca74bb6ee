"""Explicit PyTorch ADCLR attention: scores, mask, softmax, weighted sum. The tests' ground truth."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import AttentionLayout


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """Attention over ``[B, H, L, D]`` in the inputs' own dtype (use float64 for ground truth)."""
    probs = reference_probabilities(q, k, layout, scale)
    return F.dropout(probs, dropout_p) @ v if dropout_p > 0 else probs @ v


def reference_probabilities(q: torch.Tensor, k: torch.Tensor, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """Softmax attention weights ``[B, H, L, L]``; exactly zero on keys the layout forbids."""
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~layout.dense_mask(q.device), float("-inf"))
    return scores.softmax(dim=-1)
