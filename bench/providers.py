"""The attention implementations a user would otherwise pick, all built from the same ``AttentionLayout``.

Each provider maps ``(q, k, v)`` ``[B, H, L, D]`` to ``[B, H, L, D]`` under the layout, except
``full_sdpa``: unmasked attention, a different function kept only as the speed floor of a mask-free
flash kernel. ``make_providers`` returns those that can run here (with a reason for each that can't);
``flex_eager`` is FlexAttention without compilation: the peer where flex is not compiled (CPU), and
the fallback the benchmark times when the compiled one fails.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from adclr.kernels import AttentionLayout, adclr_attention, sdpa_attention

Provider = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def paper_attention(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """The appendix code: one explicit attention for CLS + raw rows, one for the query rows.

    Written for any query-key rule: the query rows' keys are the rule's slice, and the ``+self``
    rules append each query's own logit as one more column.
    """
    shared, q_start, q_self = layout.kernel_params
    attn = (q[:, :, :shared] @ k[:, :, :shared].transpose(-2, -1)) * scale
    raw = attn.softmax(dim=-1) @ v[:, :, :shared]
    if shared == layout.length:
        return raw
    queries, keys, values = q[:, :, shared:], k[:, :, q_start:shared], v[:, :, q_start:shared]
    attn = (queries @ keys.transpose(-2, -1)) * scale
    if q_self:
        self_logit = (queries * k[:, :, shared:]).sum(-1, keepdim=True) * scale
        attn = torch.cat([attn, self_logit], dim=-1).softmax(dim=-1)
        query = attn[..., :-1] @ values + attn[..., -1:] * v[:, :, shared:]
    else:
        query = attn.softmax(dim=-1) @ values
    return torch.cat([raw, query], dim=2)


def flex_mask_mod(layout: AttentionLayout):
    """FlexAttention's ``mask_mod`` for the layout (rows < S see [0, S); query rows [Q0, S) + self)."""
    shared, q_start, q_self = layout.kernel_params

    def mask_mod(b, h, q_idx, kv_idx):
        is_query = q_idx >= shared
        allowed = (kv_idx >= torch.where(is_query, q_start, 0)) & (kv_idx < shared)
        if q_self:
            allowed = allowed | (is_query & (q_idx == kv_idx))
        return allowed

    return mask_mod


def make_providers(
    layout: AttentionLayout, scale: float, device: torch.device, dtype: torch.dtype, compile_flex: bool = True
) -> tuple[dict[str, Provider], dict[str, str]]:
    """``({name: fn}, {name: why it is unavailable})`` for the layout on ``device``."""
    providers: dict[str, Provider] = {}
    missing: dict[str, str] = {}
    providers["ours"] = lambda q, k, v: adclr_attention(q, k, v, layout, scale=scale, backend="triton")
    providers["paper"] = lambda q, k, v: paper_attention(q, k, v, layout, scale)
    mask = layout.dense_mask(device)
    providers["sdpa_mask"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if layout.query_self and not layout.bidirectional and layout.num_query:
        missing["sdpa_sliced"] = "a +self rule's diagonal is not a slice of K/V"
    else:
        providers["sdpa_sliced"] = lambda q, k, v: sdpa_attention(q, k, v, layout, scale)

    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(flex_mask_mod(layout), None, None, layout.length, layout.length, device=device)
        if compile_flex:
            flex = compiled_flex()
            # Short sequences would otherwise take the decoding kernel, which is not what training uses.
            options = {"FORCE_USE_FLEX_ATTENTION": True}
            providers["flex"] = lambda q, k, v: flex(
                q, k, v, block_mask=block_mask, scale=scale, kernel_options=options
            )
        providers["flex_eager"] = lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask, scale=scale)
    except Exception as error:  # noqa: BLE001 - any failure to build the peer means "not available here"
        missing["flex"] = f"FlexAttention unavailable: {type(error).__name__}: {error}"

    try:
        import xformers.ops as xops

        bias = _xformers_bias(layout, q_dtype=dtype, device=device)
        providers["xformers"] = lambda q, k, v: xops.memory_efficient_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_bias=bias.expand(q.shape[0], q.shape[1], -1, -1),
            scale=scale,
        ).transpose(1, 2)
    except ImportError:
        missing["xformers"] = "xformers is not installed"

    providers["full_sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale)
    return providers, missing


@functools.cache
def compiled_flex():
    """``flex_attention`` under ``torch.compile``, one compiled function for every case. Each shape,
    rule and grad mode is a recompile, so the recompile limit (8 by default) is raised; and where
    torch can, hitting it raises instead of silently running eager (the benchmark then labels the
    peer ``flex_eager``)."""
    import torch._dynamo.config as config
    from torch.nn.attention.flex_attention import flex_attention

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 512))
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True
    return torch.compile(flex_attention, dynamic=False)


def _xformers_bias(layout: AttentionLayout, q_dtype, device) -> torch.Tensor:
    """Additive bias ``[1, 1, L, L]`` (0 / -inf) in storage padded to a multiple of 8, as xformers wants."""
    L = layout.length
    padded = torch.full((1, 1, L, (L + 7) // 8 * 8), float("-inf"), dtype=q_dtype, device=device)
    bias = padded[..., :L]
    bias.masked_fill_(layout.dense_mask(device), 0.0)
    return bias


def attention_flops(layout: AttentionLayout, batch: int, heads: int, head_dim: int, mode: str) -> float:
    """Useful FLOPs: 4*D per allowed (row, key) pair forward (QK^T and PV), 2.5x that backward."""
    shared, q_start, q_self = layout.kernel_params
    pairs = shared * shared + (layout.length - shared) * (shared - q_start + int(q_self))
    forward = 4.0 * batch * heads * head_dim * pairs
    return {"fwd": forward, "bwd": 2.5 * forward, "fwd+bwd": 3.5 * forward}[mode]


def attention_bytes(batch: int, heads: int, length: int, head_dim: int, element_size: int, mode: str) -> float:
    """The fewest bytes moved: q, k, v read and o written (forward); q, k, v, o, dO read and dq, dk, dv
    written (backward)."""
    tensor = batch * heads * length * head_dim * element_size
    return {"fwd": 4 * tensor, "bwd": 8 * tensor, "fwd+bwd": 12 * tensor}[mode]
