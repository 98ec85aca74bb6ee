"""Exact ADCLR attention through ``scaled_dot_product_attention``, for CPUs and GPUs below sm80.

Each layout takes the cheapest exact form: one call on K/V sliced to the shared keys where every row
sees the same keys, two sliced calls where query rows see a shorter prefix-free range, and a
boolean mask only for the query rows of a ``+self`` rule (their diagonal is not a slice).
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
    query_q = q[:, :, shared:]
    if not q_self:
        query_out = F.scaled_dot_product_attention(
            query_q, keys[:, :, q_start:], values[:, :, q_start:], scale=scale, dropout_p=dropout_p
        )
    else:
        # Query rows see keys [q_start, shared) and their own key: a mask over [q_start, L).
        query_mask = layout.dense_mask(q.device)[shared:, q_start:]
        query_out = F.scaled_dot_product_attention(
            query_q, k[:, :, q_start:], v[:, :, q_start:], attn_mask=query_mask, scale=scale, dropout_p=dropout_p
        )
    return torch.cat([raw_out, query_out], dim=2)
