"""Exact ADCLR attention through ``scaled_dot_product_attention``, for CPUs and GPUs below sm80.

Each layout takes the cheapest exact form: one call on K/V sliced to the shared keys where every row
sees the same keys, and two sliced calls where query rows see a shorter prefix-free range. The query
rows of a ``+self`` rule (their diagonal is not a slice) get an explicit softmax over their shared keys
plus one diagonal logit: Q rows against R keys, small next to the raw rows' call. No form reads a key
its row may not see, so inf or NaN in such a key cannot reach the row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import AttentionLayout


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: AttentionLayout, scale: float, dropout_p: float = 0.0
) -> torch.Tensor:
    """ADCLR attention over ``[B, H, L, D]`` built from SDPA calls; differentiable by autograd."""
    shared, q_start, q_self = layout.kernel_params
    keys, values = k[:, :, :shared], v[:, :, :shared]
    if shared == layout.length or (q_start == 0 and not q_self):
        return F.scaled_dot_product_attention(q, keys, values, scale=scale, dropout_p=dropout_p)

    raw_out = F.scaled_dot_product_attention(q[:, :, :shared], keys, values, scale=scale, dropout_p=dropout_p)
    query_q, keys, values = q[:, :, shared:], keys[:, :, q_start:], values[:, :, q_start:]
    if not q_self:
        query_out = F.scaled_dot_product_attention(query_q, keys, values, scale=scale, dropout_p=dropout_p)
    else:
        self_logit = (query_q * k[:, :, shared:]).sum(-1, keepdim=True)
        probs = torch.cat([query_q @ keys.transpose(-2, -1), self_logit], dim=-1).mul(scale).softmax(dim=-1)
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        query_out = probs[..., :-1] @ values + probs[..., -1:] * v[:, :, shared:]
    return torch.cat([raw_out, query_out], dim=2)
