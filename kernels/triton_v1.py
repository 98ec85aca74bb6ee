"""Kernel v1: the first fused ADCLR attention kernels, kept selectable (variant ``v1``) until GPU
measurements retire them.

Grid ``(B*H, blocks)``: the head on axis 0, so the blocks of one head run B*H programs apart. Each
program walks its key (or row) range in three loops (masked head, unmasked middle, masked tail); the
backward is three launches: ``Delta = rowsum(dO * O)``, dK/dV by key block, dQ by row block
(FlashAttention-2 without atomics). The semantics of ``(shared_keys, query_key_start, QUERY_SELF)``
are those of ``AttentionLayout.kernel_params``; ``kernels/triton_v2.py`` has the successors.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Lengths vary per call (197, 207, 47, ...): specialising on them (divisibility by 16) would compile a
# new kernel for each; strides stay specialised, which keeps the loads vectorised.
RUNTIME_INTS = ["num_heads", "seq_len", "shared_keys", "query_key_start"]


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


@triton.jit(do_not_specialize=RUNTIME_INTS)
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


@triton.jit(do_not_specialize=RUNTIME_INTS)
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
    # Query tokens' keys are read only when +self makes them visible (to their own row).
    load_mask = (key_in if QUERY_SELF else key_ok)[:, None] & d_ok[None, :]
    k = tl.load(
        K + b * stride_kb + h * stride_kh + keys[:, None] * stride_kl + offs_d[None, :], mask=load_mask, other=0.0
    )
    v = tl.load(
        V + b * stride_vb + h * stride_vh + keys[:, None] * stride_vl + offs_d[None, :], mask=load_mask, other=0.0
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


@triton.jit(do_not_specialize=RUNTIME_INTS)
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
