"""Fused ADCLR attention in Triton: raw self-attention and query->raw cross-attention in one pass.

Tiers (as in Liger-Kernel): ``@triton.jit`` kernels -> launchers (``_forward`` / ``_backward``) ->
``torch.library`` custom ops (opaque to ``torch.compile``) -> ``torch.autograd.Function``.

The block structure comes from ``AttentionLayout.kernel_params`` = ``(S, Q0, SELF)``: rows ``< S``
see keys ``[0, S)``; rows ``>= S`` (query tokens) see ``[Q0, S)`` plus, when ``SELF``, their own key.
Every key loop therefore covers only ``[0, S)``: blocks inside the range run without a mask, and only
the first block (when ``Q0 > 0``) and the last (``S`` is never a multiple of the block) pay for one.
The ``+self`` diagonal is one extra logit per query row, computed from that row's own k and v; no
query-token K/V tile is ever loaded. Softmax runs online in fp32 with exp2; the forward saves the
log-sum-exp (base 2) and the backward is FlashAttention-2's: ``Delta = rowsum(dO * O)``, then one
kernel for dK/dV (one program per key block, no atomics: deterministic) and one for dQ.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .layout import AttentionLayout

LOG2E = 1.4426950408889634
# Lengths vary per call (197, 207, 47, ...): specialising on them (divisibility by 16) would compile a
# new kernel for each; strides stay specialised, which keeps the loads vectorised.
_RUNTIME_INTS = ["num_heads", "seq_len", "shared_keys", "query_key_start"]


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kl,
    stride_vl,
    start_n,
    row_start,
    shared_keys,
    qk_scale,
    offs_n,
    offs_d,
    d_ok,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One key block of the online softmax. ``MASKED`` blocks apply per-row key ranges."""
    keys = start_n + offs_n
    if MASKED:
        key_ok = keys < shared_keys
        kT = tl.load(
            k_base + keys[None, :] * stride_kl + offs_d[:, None], mask=d_ok[:, None] & key_ok[None, :], other=0.0
        )
        v = tl.load(
            v_base + keys[:, None] * stride_vl + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0
        )
    else:
        kT = tl.load(k_base + keys[None, :] * stride_kl + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vl + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
    if MASKED:
        allowed = (keys[None, :] >= row_start[:, None]) & key_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _key_blocks(start_m, shared_keys, query_key_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-block bounds for a row block: [lo, head) masked, [head, tail) unmasked, [tail, S) masked."""
    has_raw_rows = start_m < shared_keys
    has_query_rows = start_m + BLOCK_M > shared_keys
    lo = tl.where(has_raw_rows, 0, (query_key_start // BLOCK_N) * BLOCK_N)
    head = tl.where(has_query_rows, tl.cdiv(query_key_start, BLOCK_N) * BLOCK_N, 0)
    head = tl.maximum(head, lo)
    tail = tl.maximum((shared_keys // BLOCK_N) * BLOCK_N, head)
    return lo, head, tail


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_ob,
    stride_oh,
    stride_ol,
    num_heads,
    seq_len,
    shared_keys,
    query_key_start,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUERY_SELF: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seq_len
    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    is_query = offs_m >= shared_keys
    row_start = tl.where(is_query, query_key_start, 0)

    # A finite floor instead of -inf keeps rows whose keys all lie in a later block NaN-free.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if QUERY_SELF:
        # The diagonal logit of each query row seeds its online softmax.
        has_self = is_query & row_ok
        self_mask = has_self[:, None] & d_ok[None, :]
        k_self = tl.load(k_base + offs_m[:, None] * stride_kl + offs_d[None, :], mask=self_mask, other=0.0)
        v_self = tl.load(v_base + offs_m[:, None] * stride_vl + offs_d[None, :], mask=self_mask, other=0.0)
        s_self = tl.sum(q.to(tl.float32) * k_self.to(tl.float32), 1) * qk_scale
        m_i = tl.where(has_self, s_self, m_i)
        l_i = tl.where(has_self, 1.0, 0.0)
        acc = tl.where(has_self[:, None], v_self.to(tl.float32), 0.0)

    lo, head, tail = _key_blocks(start_m, shared_keys, query_key_start, BLOCK_M, BLOCK_N)
    for start_n in range(lo, head, BLOCK_N):
        acc, l_i, m_i = _fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kl,
            stride_vl,
            start_n,
            row_start,
            shared_keys,
            qk_scale,
            offs_n,
            offs_d,
            d_ok,
            True,
            PRECISION,
        )
    for start_n in range(head, tail, BLOCK_N):
        acc, l_i, m_i = _fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kl,
            stride_vl,
            start_n,
            row_start,
            shared_keys,
            qk_scale,
            offs_n,
            offs_d,
            d_ok,
            False,
            PRECISION,
        )
    for start_n in range(tail, shared_keys, BLOCK_N):
        acc, l_i, m_i = _fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kl,
            stride_vl,
            start_n,
            row_start,
            shared_keys,
            qk_scale,
            offs_n,
            offs_d,
            d_ok,
            True,
            PRECISION,
        )

    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * seq_len + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit(do_not_specialize=["num_heads", "seq_len"])
def _bwd_delta_kernel(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_dob,
    stride_doh,
    stride_dol,
    num_heads,
    seq_len,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Delta_i = sum_d dO_id * O_id, the softmax-gradient correction of every row."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seq_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol + offs_d[None, :], mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * seq_len + offs_m, delta, mask=offs_m < seq_len)


@triton.jit
def _bwd_dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_ql,
    stride_dol,
    start_m,
    keys,
    key_ok,
    row_end,
    shared_keys,
    query_key_start,
    qk_scale,
    offs_m,
    offs_d,
    d_ok,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Contribution of one row block to a key block's dK and dV (transposed scores, FA-2)."""
    rows = start_m + offs_m
    if MASKED:
        row_ok = rows < row_end
        qT = tl.load(
            q_base + rows[None, :] * stride_ql + offs_d[:, None], mask=d_ok[:, None] & row_ok[None, :], other=0.0
        )
        do = tl.load(
            do_base + rows[:, None] * stride_dol + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
        )
        lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    else:
        qT = tl.load(q_base + rows[None, :] * stride_ql + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dol + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        lse = tl.load(lse_base + rows)
        delta = tl.load(delta_base + rows)
    sT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale
    pT = tl.math.exp2(sT - lse[None, :])
    if MASKED:
        row_start = tl.where(rows >= shared_keys, query_key_start, 0)
        allowed = key_ok[:, None] & row_ok[None, :] & (keys[:, None] >= row_start[None, :])
        pT = tl.where(allowed, pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_dob,
    stride_doh,
    stride_dol,
    stride_dkb,
    stride_dkh,
    stride_dkl,
    stride_dvb,
    stride_dvh,
    stride_dvl,
    num_heads,
    seq_len,
    shared_keys,
    query_key_start,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUERY_SELF: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    start_n = tl.program_id(1) * BLOCK_N
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + pid_bh * seq_len
    delta_base = DELTA + pid_bh * seq_len

    offs_m = tl.arange(0, BLOCK_M)
    keys = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    key_in = keys < seq_len
    key_ok = keys < shared_keys
    kv_mask = key_in[:, None] & d_ok[None, :]
    k = tl.load(
        K + b * stride_kb + h * stride_kh + keys[:, None] * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0
    )
    v = tl.load(
        V + b * stride_vb + h * stride_vh + keys[:, None] * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Rows that see this key block: every raw row, and the query rows unless all keys precede Q0.
    # Blocks of keys at or past S (query tokens) get no tile contribution at all.
    row_end = tl.where(start_n + BLOCK_N <= query_key_start, shared_keys, seq_len)
    row_end = tl.where(start_n < shared_keys, row_end, 0)
    boundary = (start_n < query_key_start) | (start_n + BLOCK_N > shared_keys)
    unmasked_end = tl.where(boundary, 0, (row_end // BLOCK_M) * BLOCK_M)
    for start_m in range(0, unmasked_end, BLOCK_M):
        dk, dv = _bwd_dkdv_inner(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_ql,
            stride_dol,
            start_m,
            keys,
            key_ok,
            row_end,
            shared_keys,
            query_key_start,
            qk_scale,
            offs_m,
            offs_d,
            d_ok,
            False,
            PRECISION,
        )
    for start_m in range(unmasked_end, row_end, BLOCK_M):
        dk, dv = _bwd_dkdv_inner(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_ql,
            stride_dol,
            start_m,
            keys,
            key_ok,
            row_end,
            shared_keys,
            query_key_start,
            qk_scale,
            offs_m,
            offs_d,
            d_ok,
            True,
            PRECISION,
        )

    if QUERY_SELF:
        # A query token's key is seen by its own row only: key j's gradient is row j's diagonal term.
        is_qkey = (keys >= shared_keys) & key_in
        diag_mask = is_qkey[:, None] & d_ok[None, :]
        q_j = tl.load(q_base + keys[:, None] * stride_ql + offs_d[None, :], mask=diag_mask, other=0.0).to(tl.float32)
        do_j = tl.load(do_base + keys[:, None] * stride_dol + offs_d[None, :], mask=diag_mask, other=0.0).to(tl.float32)
        lse_j = tl.load(lse_base + keys, mask=is_qkey, other=0.0)
        delta_j = tl.load(delta_base + keys, mask=is_qkey, other=0.0)
        p = tl.math.exp2(tl.sum(q_j * k.to(tl.float32), 1) * qk_scale - lse_j)
        p = tl.where(is_qkey, p, 0.0)
        ds = p * (tl.sum(do_j * v.to(tl.float32), 1) - delta_j)
        dv += p[:, None] * do_j
        dk += ds[:, None] * q_j

    dk *= sm_scale
    tl.store(
        DK + b * stride_dkb + h * stride_dkh + keys[:, None] * stride_dkl + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV + b * stride_dvb + h * stride_dvh + keys[:, None] * stride_dvl + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit
def _bwd_dq_inner(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    stride_kl,
    stride_vl,
    start_n,
    row_start,
    shared_keys,
    qk_scale,
    offs_n,
    offs_d,
    d_ok,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Contribution of one key block to a row block's dQ."""
    keys = start_n + offs_n
    if MASKED:
        key_ok = keys < shared_keys
        kT = tl.load(
            k_base + keys[None, :] * stride_kl + offs_d[:, None], mask=d_ok[:, None] & key_ok[None, :], other=0.0
        )
        vT = tl.load(
            v_base + keys[None, :] * stride_vl + offs_d[:, None], mask=d_ok[:, None] & key_ok[None, :], other=0.0
        )
    else:
        kT = tl.load(k_base + keys[None, :] * stride_kl + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        vT = tl.load(v_base + keys[None, :] * stride_vl + offs_d[:, None], mask=d_ok[:, None], other=0.0)
    s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        allowed = (keys[None, :] >= row_start[:, None]) & key_ok[None, :]
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, vT, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_dob,
    stride_doh,
    stride_dol,
    stride_dqb,
    stride_dqh,
    stride_dql,
    num_heads,
    seq_len,
    shared_keys,
    query_key_start,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUERY_SELF: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seq_len
    row_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :], mask=row_mask, other=0.0
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol + offs_d[None, :], mask=row_mask, other=0.0
    )
    lse = tl.load(LSE + pid_bh * seq_len + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh * seq_len + offs_m, mask=row_ok, other=0.0)
    is_query = offs_m >= shared_keys
    row_start = tl.where(is_query, query_key_start, 0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, head, tail = _key_blocks(start_m, shared_keys, query_key_start, BLOCK_M, BLOCK_N)
    for start_n in range(lo, head, BLOCK_N):
        dq = _bwd_dq_inner(
            dq,
            q,
            do,
            lse,
            delta,
            k_base,
            v_base,
            stride_kl,
            stride_vl,
            start_n,
            row_start,
            shared_keys,
            qk_scale,
            offs_n,
            offs_d,
            d_ok,
            True,
            PRECISION,
        )
    for start_n in range(head, tail, BLOCK_N):
        dq = _bwd_dq_inner(
            dq,
            q,
            do,
            lse,
            delta,
            k_base,
            v_base,
            stride_kl,
            stride_vl,
            start_n,
            row_start,
            shared_keys,
            qk_scale,
            offs_n,
            offs_d,
            d_ok,
            False,
            PRECISION,
        )
    for start_n in range(tail, shared_keys, BLOCK_N):
        dq = _bwd_dq_inner(
            dq,
            q,
            do,
            lse,
            delta,
            k_base,
            v_base,
            stride_kl,
            stride_vl,
            start_n,
            row_start,
            shared_keys,
            qk_scale,
            offs_n,
            offs_d,
            d_ok,
            True,
            PRECISION,
        )

    if QUERY_SELF:
        has_self = is_query & row_ok
        self_mask = has_self[:, None] & d_ok[None, :]
        k_self = tl.load(k_base + offs_m[:, None] * stride_kl + offs_d[None, :], mask=self_mask, other=0.0).to(
            tl.float32
        )
        v_self = tl.load(v_base + offs_m[:, None] * stride_vl + offs_d[None, :], mask=self_mask, other=0.0).to(
            tl.float32
        )
        p = tl.math.exp2(tl.sum(q.to(tl.float32) * k_self, 1) * qk_scale - lse)
        p = tl.where(has_self, p, 0.0)
        ds = p * (tl.sum(do.to(tl.float32) * v_self, 1) - delta)
        dq += ds[:, None] * k_self

    dq *= sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dql + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=row_mask,
    )


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------

# Tiles. Under the CPU interpreter: small fixed blocks (it runs one program at a time; 32 exercises the
# boundary and interior paths of short test sequences). On a GPU: a table by head dim, sized for the
# shared memory of sm70 (96 KB) upwards; ADCLR_AUTOTUNE=1 autotunes over a few configurations
# instead, once per (head dim, rule, dtype): the sequence length is not part of the key, so a new L
# does not retune.
_INTERPRETER_TILES = dict(BLOCK_M=32, BLOCK_N=32)
# head dim bound -> (BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward, dK/dV and dQ kernels.
_TILE_TABLE = {  # 8 warps: with 4, these tiles hit 255 registers and spill (bench/compile_check.py, sm90)
    "fwd": ((64, (128, 64, 8, 3)), (128, (64, 64, 8, 2)), (256, (64, 32, 8, 2))),
    "dkdv": ((64, (64, 64, 8, 3)), (128, (64, 32, 8, 2)), (256, (32, 32, 8, 2))),
    "dq": ((64, (64, 64, 8, 3)), (128, (64, 32, 8, 2)), (256, (32, 32, 8, 2))),
}
# fp32 operands are twice the bytes and their exact products (tf32x3 / FMA) need more registers:
# the half-precision tiles would take 160 KB of shared memory and spill kilobytes per thread.
_FP32_TILE_TABLE = {  # head dims up to 128 (the public API refuses larger fp32 ones)
    "fwd": ((64, (64, 32, 4, 2)), (128, (32, 32, 8, 2))),
    "dkdv": ((64, (64, 32, 8, 2)), (128, (32, 32, 8, 2))),
    "dq": ((64, (32, 32, 4, 2)), (128, (32, 32, 8, 2))),
}


def _table_tiles(kind: str, head_dim: int, dtype: torch.dtype) -> dict:
    table = _FP32_TILE_TABLE if dtype == torch.float32 else _TILE_TABLE
    for bound, (block_m, block_n, warps, stages) in table[kind]:
        if head_dim <= bound:
            return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    raise ValueError(f"head dim {head_dim} exceeds the largest the tile table covers for {dtype}")


def _autotune_configs(pairs):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


_TUNE_KEY = ["BLOCK_D", "QUERY_SELF"]  # the autotuner adds the tensor dtypes itself
_AUTOTUNED = {
    "fwd": triton.autotune(
        _autotune_configs(
            [(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4), (128, 128, 8, 2)]
        ),
        key=_TUNE_KEY,
    )(_fwd_kernel),
    "dkdv": triton.autotune(
        _autotune_configs([(64, 64, 4, 3), (32, 128, 4, 3), (32, 64, 4, 3), (64, 128, 8, 2), (32, 32, 4, 4)]),
        key=_TUNE_KEY,
    )(_bwd_dkdv_kernel),
    "dq": triton.autotune(
        _autotune_configs([(64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3)]), key=_TUNE_KEY
    )(_bwd_dq_kernel),
}
_PLAIN = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _launch(kind: str, grid, t: torch.Tensor, *args, **kwargs) -> None:
    """Launch kernel ``kind`` with the interpreter's tiles, the GPU table's, or autotuned ones."""
    if _interpreting(t):
        _PLAIN[kind][grid](*args, **kwargs, **_INTERPRETER_TILES)
    elif os.environ.get("ADCLR_AUTOTUNE", "0") == "1":
        _AUTOTUNED[kind][grid](*args, **kwargs)
    else:
        _PLAIN[kind][grid](*args, **kwargs, **_table_tiles(kind, t.shape[-1], t.dtype))


def _strides(t: torch.Tensor):
    """(batch, head, sequence) strides of a ``[B, H, L, D]`` view whose last dim is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)


def dot_precision(dtype: torch.dtype, capability: tuple[int, int] | None) -> str:
    """``tl.dot``'s input precision. fp16/bf16 use the tensor cores as they are. fp32 keeps fp32
    accuracy: three TF32 products (``tf32x3``) on sm80+, exact FMA (``ieee``) below sm80 (no TF32)
    and under the interpreter (``capability`` None). Plain ``ieee`` on sm80+ would spill kilobytes."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32x3" if capability is not None and capability >= (8, 0) else "ieee"


def _dims(q: torch.Tensor, query_self: bool):
    head_dim = q.shape[-1]
    capability = None if _interpreting(q) else torch.cuda.get_device_capability(q.device)
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        QUERY_SELF=query_self,
        PRECISION=dot_precision(q.dtype, capability),
    )


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q, k, v, o, lse, shared_keys: int, query_key_start: int, query_self: bool, scale: float) -> None:
    """Write the output into ``o`` (a ``[B, H, L, D]`` view) and the base-2 log-sum-exp into ``lse``
    (fp32 ``[B*H, L]``)."""
    batch, heads, seq_len, _ = q.shape
    grid = lambda meta: (batch * heads, triton.cdiv(seq_len, meta["BLOCK_M"]))  # noqa: E731
    _launch(
        "fwd",
        grid,
        q,
        q,
        k,
        v,
        o,
        lse,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(o),
        heads,
        seq_len,
        shared_keys,
        query_key_start,
        scale * LOG2E,
        **_dims(q, query_self),
    )


def _backward(do, q, k, v, o, lse, dq, dk, dv, shared_keys: int, query_key_start: int, query_self: bool, scale: float):
    """Write dQ, dK, dV (``[B, H, L, D]`` views) for the forward that produced ``o`` and ``lse``."""
    batch, heads, seq_len, head_dim = q.shape
    dims = _dims(q, query_self)
    delta = torch.empty_like(lse)
    delta_block = 32 if _interpreting(q) else 64
    _bwd_delta_kernel[(batch * heads, triton.cdiv(seq_len, delta_block))](
        o,
        do,
        delta,
        *_strides(o),
        *_strides(do),
        heads,
        seq_len,
        HEAD_DIM=head_dim,
        BLOCK_D=dims["BLOCK_D"],
        BLOCK_M=delta_block,
    )
    layout_args = (heads, seq_len, shared_keys, query_key_start, scale * LOG2E, scale)
    grid_kv = lambda meta: (batch * heads, triton.cdiv(seq_len, meta["BLOCK_N"]))  # noqa: E731
    _launch(
        "dkdv",
        grid_kv,
        q,
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(do),
        *_strides(dk),
        *_strides(dv),
        *layout_args,
        **dims,
    )
    grid_q = lambda meta: (batch * heads, triton.cdiv(seq_len, meta["BLOCK_M"]))  # noqa: E731
    _launch(
        "dq",
        grid_q,
        q,
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(do),
        *_strides(dq),
        *layout_args,
        **dims,
    )


# --------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, so a compiled model keeps the fused kernel without a graph break.
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("adclr::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shared_keys: int,
    query_key_start: int,
    query_self: bool,
    scale: float,
    seq_major: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(o, lse)``; ``o`` is ``[B, L, H, D]`` when ``seq_major`` else ``[B, H, L, D]``."""
    batch, heads, seq_len, head_dim = q.shape
    if seq_major:
        o = q.new_empty((batch, seq_len, heads, head_dim))
        o_view = o.transpose(1, 2)
    else:
        o = o_view = q.new_empty((batch, heads, seq_len, head_dim))
    lse = q.new_empty((batch * heads, seq_len), dtype=torch.float32)
    _forward(q, k, v, o_view, lse, shared_keys, query_key_start, query_self, scale)
    return o, lse


@_attention_fwd_op.register_fake
def _(q, k, v, shared_keys, query_key_start, query_self, scale, seq_major):
    batch, heads, seq_len, head_dim = q.shape
    shape = (batch, seq_len, heads, head_dim) if seq_major else (batch, heads, seq_len, head_dim)
    return q.new_empty(shape), q.new_empty((batch * heads, seq_len), dtype=torch.float32)


@torch.library.custom_op("adclr::attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    shared_keys: int,
    query_key_start: int,
    query_self: bool,
    scale: float,
    seq_major: bool,
) -> torch.Tensor:
    """Returns dq, dk, dv stacked: ``[B, L, 3, H, D]`` when ``seq_major`` (a packed qkv's gradient)
    else ``[3, B, H, L, D]``. ``do`` and ``o`` are ``[B, H, L, D]`` views."""
    batch, heads, seq_len, head_dim = q.shape
    if seq_major:
        grads = q.new_empty((batch, seq_len, 3, heads, head_dim))
        dq, dk, dv = grads.permute(2, 0, 3, 1, 4).unbind(0)
    else:
        grads = q.new_empty((3, batch, heads, seq_len, head_dim))
        dq, dk, dv = grads.unbind(0)
    _backward(do, q, k, v, o, lse, dq, dk, dv, shared_keys, query_key_start, query_self, scale)
    return grads


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, shared_keys, query_key_start, query_self, scale, seq_major):
    batch, heads, seq_len, head_dim = q.shape
    shape = (batch, seq_len, 3, heads, head_dim) if seq_major else (3, batch, heads, seq_len, head_dim)
    return q.new_empty(shape)


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


class TritonADCLRAttention(torch.autograd.Function):
    """ADCLR attention of separate ``q, k, v`` ``[B, H, L, D]``; returns ``[B, H, L, D]``."""

    @staticmethod
    def forward(ctx, q, k, v, shared_keys: int, query_key_start: int, query_self: bool, scale: float):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        params = (shared_keys, query_key_start, query_self, scale)
        o, lse = _attention_fwd_op(q, k, v, *params, False)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.params = params
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        grads = _attention_bwd_op(_last_dim_contiguous(do), q, k, v, o, lse, *ctx.params, False)
        dq, dk, dv = grads.unbind(0)
        return dq, dk, dv, None, None, None, None


class TritonADCLRAttentionPacked(torch.autograd.Function):
    """ADCLR attention of a packed ``qkv`` ``[B, L, 3, H, D]``; returns ``[B, L, H, D]``.

    q, k, v are read in place from ``qkv`` and the gradient comes back as one ``[B, L, 3, H, D]``
    tensor, so neither direction copies or transposes around the kernel.
    """

    @staticmethod
    def forward(ctx, qkv, shared_keys: int, query_key_start: int, query_self: bool, scale: float):
        qkv = _last_dim_contiguous(qkv)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        params = (shared_keys, query_key_start, query_self, scale)
        o, lse = _attention_fwd_op(q, k, v, *params, True)
        ctx.save_for_backward(qkv, o, lse)
        ctx.params = params
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, o, lse = ctx.saved_tensors
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        do = _last_dim_contiguous(do).transpose(1, 2)
        grads = _attention_bwd_op(do, q, k, v, o.transpose(1, 2), lse, *ctx.params, True)
        return grads, None, None, None, None


def triton_attention(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """Fused ADCLR attention over ``[B, H, L, D]`` (inputs already validated by the public API)."""
    return TritonADCLRAttention.apply(q, k, v, *layout.kernel_params, scale)


def triton_attention_packed(qkv, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """Fused ADCLR attention of a packed ``[B, L, 3, H, D]`` qkv; returns ``[B, L, H, D]``."""
    return TritonADCLRAttentionPacked.apply(qkv, *layout.kernel_params, scale)
