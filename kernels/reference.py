"""Explicit PyTorch ADCLR attention: scores, softmax and weighted sum per set of allowed keys. The tests'
ground truth.

Masking is by selection, not by multiplication: each group of rows that shares one key set (read off
``AttentionLayout.dense_mask``) is computed on exactly those keys, so a key a row may not see cannot
reach it, even when its k or v holds inf or NaN (``0 * inf`` would be NaN), forward or backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import AttentionLayout


def _row_groups(layout: AttentionLayout, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(rows, keys), ...]``: index tensors of the rows that share one key set, and that key set."""
    mask = layout.dense_mask(device)
    patterns, group_of_row = torch.unique(mask, dim=0, return_inverse=True)
    return [
        (torch.nonzero(group_of_row == g).flatten(), torch.nonzero(keys).flatten()) for g, keys in enumerate(patterns)
    ]


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """Attention over ``[B, H, L, D]`` in the inputs' own dtype (use float64 for ground truth)."""
    out = q.new_empty(q.shape)
    for rows, keys in _row_groups(layout, q.device):
        probs = (q[..., rows, :] @ k[..., keys, :].transpose(-2, -1) * scale).softmax(dim=-1)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        out[..., rows, :] = probs @ v[..., keys, :]
    return out


def reference_probabilities(q: torch.Tensor, k: torch.Tensor, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """Softmax attention weights ``[B, H, L, L]``; exactly zero on keys the layout forbids."""
    probs = q.new_zeros(q.shape[:-1] + (layout.length,))
    for rows, keys in _row_groups(layout, q.device):
        probs[..., rows[:, None], keys] = (q[..., rows, :] @ k[..., keys, :].transpose(-2, -1) * scale).softmax(dim=-1)
    return probs
