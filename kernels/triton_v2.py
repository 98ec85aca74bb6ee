"""The ADCLR attention kernels, shaped for ViT sequence lengths (L = 47, 207, 795).

Against the first kernel generation (v1: a 2-D grid with the head fastest, 8-warp tiles, three
backward launches; removed, never measured and predicted slower everywhere):

- **Grid order.** One grid axis, the sequence block fastest: the programs of one head are adjacent,
  so a head's K/V (forward) or Q, K, V, O, dO (backward) come from DRAM once and from L2 for the
  head's other programs. ``pid -> (block, head)`` by one division: no 65 535 limit on any axis to
  fall back from (2**31 - 1 programs).
- **One key loop.** Every program walks its key (or row) range in a single pipelined loop; the
  score mask is computed only in boundary blocks (first block when a rule hides the prefix, last
  block at ``S``, and row blocks that reach the query rows), chosen by a scalar test per block.
- **Backward.** ``short`` (L <= 128): one program per head loads Q, K, V, dO once and computes
  Delta (from the tile: O is not needed), dQ, dK, dV from one score tile: five matrix products, no
  recomputation, no atomics.
  ``fused`` (any L): one launch. Programs ``[0, n)`` of a head own a key block and produce its
  dK/dV; programs ``[n, 2n)`` own a row block and produce its dQ. Delta = rowsum(dO * O) is computed
  where it is needed (no separate pass). No atomics: deterministic.

Every kernel takes the layout as ``(shared_keys S, query_key_start Q0, QUERY_SELF)``
(``AttentionLayout.kernel_params``): rows ``< S`` see keys ``[0, S)``, rows ``>= S`` see
``[Q0, S)`` plus their own key when ``QUERY_SELF``. ``seq_bucket`` is unused by the code: it is
the sequence-length bucket the autotuner keys on.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Never specialised (a new L would otherwise compile a new kernel); strides stay specialised.
RUNTIME_INTS = ["num_heads", "seq_len", "shared_keys", "query_key_start", "seq_bucket"]


@triton.jit
def _key_range(start_m, shared_keys, query_key_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the row block at ``start_m``: the first key block to visit and the unmasked span
    ``[full_lo, full_hi)``; blocks outside it (up to ``S``) need the score mask."""
    has_raw_rows = start_m < shared_keys
    has_query_rows = start_m + BLOCK_M > shared_keys
    lo = tl.where(has_raw_rows, 0, (query_key_start // BLOCK_N) * BLOCK_N)
    full_lo = tl.where(has_query_rows, tl.cdiv(query_key_start, BLOCK_N) * BLOCK_N, 0)
    full_hi = (shared_keys // BLOCK_N) * BLOCK_N
    return lo, full_lo, full_hi


@triton.jit
def _online_softmax_step(s, m_i, l_i, acc):
    """One key block of the online softmax (base 2): the block's weights ``p`` and the running max,
    sum and rescaled accumulator, to which the caller adds ``p @ V``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return p, m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None]


@triton.jit
def _clear_hidden_prefix(x, keys, query_key_start, KEY_AXIS: tl.constexpr):
    """``x`` (a K or V tile, keys along ``KEY_AXIS``) with inf and NaN zeroed in the keys below
    ``query_key_start``, and which keys held one (int32 0/1 per key). Such a key is hidden from the
    query rows but seen by the raw rows of the same tile, and a zero weight times inf or NaN in a
    product over keys is NaN: the query rows need it cleared; the raw rows that see it get NaN from
    the caller instead."""
    if KEY_AXIS == 0:
        hidden = (keys < query_key_start)[:, None]
    else:
        hidden = (keys < query_key_start)[None, :]
    bad = ((x != x) | (tl.abs(x) == float("inf"))) & hidden
    return tl.where(bad, 0.0, x), tl.max(bad.to(tl.int32), 1 - KEY_AXIS)


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
    seq_bucket,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUERY_SELF: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HIDDEN_PREFIX: tl.constexpr,
):
    """Output and base-2 log-sum-exp of one ``BLOCK_M`` row block (online softmax, exp2).
    ``HIDDEN_PREFIX``: the rule hides keys below ``query_key_start > 0`` from the query rows."""
    row_blocks = tl.cdiv(seq_len, BLOCK_M)
    pid = tl.program_id(0)
    bh = (pid // row_blocks).to(tl.int64)
    start_m = (pid % row_blocks) * BLOCK_M
    b = bh // num_heads
    h = bh % num_heads
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

    lo, full_lo, full_hi = _key_range(start_m, shared_keys, query_key_start, BLOCK_M, BLOCK_N)
    # Key blocks below full_lo: the prefix under rules that hide it, in a row block that holds query
    # rows (usually one block). The raw rows see these keys, the query rows must not, even when a V
    # holds inf or NaN, and a zero weight times NaN is NaN: each such block runs the P V product twice,
    # on V as it is (raw rows) and on V loaded without the hidden keys (query rows). Kept out of the
    # main loop, whose pipelining and registers stay those of a plain flash loop.
    if HIDDEN_PREFIX:  # rules that hide the prefix from query rows (compiled only for them)
        for start_n in tl.range(lo, full_lo, BLOCK_N, num_stages=1):
            keys = start_n + offs_n
            key_ok = keys < shared_keys
            kT = tl.load(
                k_base + keys[None, :] * stride_kl + offs_d[:, None], mask=d_ok[:, None] & key_ok[None, :], other=0.0
            )
            v_ptrs = v_base + keys[:, None] * stride_vl + offs_d[None, :]
            v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            v_query = tl.load(v_ptrs, mask=(key_ok & (keys >= query_key_start))[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
            s = tl.where((keys[None, :] >= row_start[:, None]) & key_ok[None, :], s, float("-inf"))
            p, m_i, l_i, acc = _online_softmax_step(s, m_i, l_i, acc)
            acc_raw = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
            acc = tl.dot(p.to(v.dtype), v_query, acc, input_precision=PRECISION)
            acc = tl.where(is_query[:, None], acc, acc_raw)

    for start_n in range(full_lo, shared_keys, BLOCK_N):
        keys = start_n + offs_n
        key_ok = keys < shared_keys
        kT = tl.load(
            k_base + keys[None, :] * stride_kl + offs_d[:, None], mask=d_ok[:, None] & key_ok[None, :], other=0.0
        )
        v = tl.load(
            v_base + keys[:, None] * stride_vl + offs_d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0
        )
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        if start_n >= full_hi:
            s = tl.where((keys[None, :] >= row_start[:, None]) & key_ok[None, :], s, float("-inf"))
        p, m_i, l_i, acc = _online_softmax_step(s, m_i, l_i, acc)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)

    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_mask)
    tl.store(LSE + bh * seq_len + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _bwd_short_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DQ,
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
    stride_dqb,
    stride_dqh,
    stride_dql,
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
    seq_bucket,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUERY_SELF: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HIDDEN_KEYS: tl.constexpr,
):
    """The whole backward of one head whose L fits one ``BLOCK_L`` tile: q, k, v, dO read once, one
    score tile, five products (S = Q K^T, dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q). With
    every key of a row in the tile, Delta = rowsum(P * dP), as PyTorch's softmax backward computes
    it: O is not read (7 tensors moved, not 8). ``HIDDEN_KEYS``: the rule hides a loaded key from some
    row (``query_key_start > 0`` or ``QUERY_SELF``); the default rule compiles without those masks."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // num_heads
    h = bh % num_heads
    idx = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    ok = idx < seq_len
    d_ok = (offs_d < HEAD_DIM)[None, :]
    mask = ok[:, None] & d_ok
    # Keys no row may see (query tokens' own keys, unless +self) are not read: whatever they hold
    # (inf, NaN) must not reach a product.
    kv_mask = (idx < (seq_len if QUERY_SELF else shared_keys))[:, None] & d_ok
    q = tl.load(Q + b * stride_qb + h * stride_qh + idx[:, None] * stride_ql + offs_d[None, :], mask=mask, other=0.0)
    k = tl.load(K + b * stride_kb + h * stride_kh + idx[:, None] * stride_kl + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + idx[:, None] * stride_vl + offs_d[None, :], mask=kv_mask, other=0.0)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + idx[:, None] * stride_dol + offs_d[None, :], mask=mask, other=0.0
    )
    lse = tl.load(LSE + bh * seq_len + idx, mask=ok, other=0.0)

    # Rows (axis 0) x keys (axis 1). Rows < S see [0, S); query rows [Q0, S) and, with +self, themselves.
    rows = idx[:, None]
    keys = idx[None, :]
    allowed = (keys < shared_keys) & (keys >= tl.where(rows >= shared_keys, query_key_start, 0))
    if QUERY_SELF:
        allowed = allowed | ((rows == keys) & (rows >= shared_keys))
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.where(allowed, tl.math.exp2(s - lse[:, None]), 0.0)
    dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if HIDDEN_KEYS:
        # Some key of the tile is loaded but hidden from some row (the prefix under ``raw`` rules, the
        # query tokens' keys under ``+self``): dP and dS are masked too, so that inf/NaN in its V (dP)
        # or in the Delta of a row that sees one (dS) reaches no other row or key, and inf/NaN in
        # such a key's K is cleared before the dQ product (a zero weight times NaN is NaN).
        dp = tl.where(allowed, dp, 0.0)
        ds = tl.where(allowed, p * (dp - tl.sum(p * dp, 1)[:, None]), 0.0)
        hidden = (idx < query_key_start) | (idx >= shared_keys)
        k = tl.where(((k * 0.0) != 0.0) & hidden[:, None], 0.0, k)
    else:
        ds = p * (dp - tl.sum(p * dp, 1)[:, None])
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * sm_scale
    dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION) * sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + idx[:, None] * stride_dql + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        DK + b * stride_dkb + h * stride_dkh + idx[:, None] * stride_dkl + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        DV + b * stride_dvb + h * stride_dvh + idx[:, None] * stride_dvl + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _dkdv_program(
    q_base,
    k_base,
    v_base,
    o_base,
    do_base,
    lse_base,
    dk_base,
    dv_base,
    stride_ql,
    stride_kl,
    stride_vl,
    stride_ol,
    stride_dol,
    stride_dkl,
    stride_dvl,
    start_n,
    seq_len,
    shared_keys,
    query_key_start,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUERY_SELF: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_OWN: tl.constexpr,
    BLOCK_STEP: tl.constexpr,
):
    """dK, dV of the key block at ``start_n``, looping over the row blocks that see it."""
    keys = start_n + tl.arange(0, BLOCK_OWN)
    offs_m = tl.arange(0, BLOCK_STEP)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    key_in = keys < seq_len
    key_ok = keys < shared_keys
    kv_mask = key_in[:, None] & d_ok[None, :]
    # Query tokens' keys are read only when +self makes them visible (to their own row).
    load_mask = (key_in if QUERY_SELF else key_ok)[:, None] & d_ok[None, :]
    k = tl.load(k_base + keys[:, None] * stride_kl + offs_d[None, :], mask=load_mask, other=0.0)
    v = tl.load(v_base + keys[:, None] * stride_vl + offs_d[None, :], mask=load_mask, other=0.0)
    dk = tl.zeros([BLOCK_OWN, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_OWN, BLOCK_D], dtype=tl.float32)

    # Rows that see this block: the raw rows, and the query rows when the block reaches [Q0, S).
    # Key blocks at or past S (query tokens' keys) are seen by no row block.
    row_end = tl.where(start_n + BLOCK_OWN > query_key_start, seq_len, shared_keys)
    row_end = tl.where(start_n < shared_keys, row_end, 0)
    keys_past_s = start_n + BLOCK_OWN > shared_keys
    for start_m in range(0, row_end, BLOCK_STEP):
        rows = start_m + offs_m
        row_ok = rows < row_end
        rd_mask = row_ok[:, None] & d_ok[None, :]
        qT = tl.load(
            q_base + rows[None, :] * stride_ql + offs_d[:, None], mask=d_ok[:, None] & row_ok[None, :], other=0.0
        )
        do = tl.load(do_base + rows[:, None] * stride_dol + offs_d[None, :], mask=rd_mask, other=0.0)
        o = tl.load(o_base + rows[:, None] * stride_ol + offs_d[None, :], mask=rd_mask, other=0.0)
        lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        pT = tl.math.exp2(tl.dot(k, qT, input_precision=PRECISION) * qk_scale - lse[None, :])
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        # Unmasked unless the key block reaches past S or the row block reaches the query rows. dS is
        # masked too: a row that sees an inf/NaN key has a non-finite Delta, which must not reach the
        # keys hidden from it (nor may this block's own inf/NaN V reach rows it is hidden from).
        if keys_past_s | (start_m + BLOCK_STEP > shared_keys):
            row_start = tl.where(rows >= shared_keys, query_key_start, 0)
            seen = key_ok[:, None] & row_ok[None, :] & (keys[:, None] >= row_start[None, :])
            pT = tl.where(seen, pT, 0.0)
            dsT = tl.where(seen, dsT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)

    if QUERY_SELF:
        if keys_past_s:
            # A query token's key is seen by its own row only: key j's gradient is row j's diagonal
            # term. Ordered so that each [BLOCK_OWN, D] operand dies before the next is loaded.
            is_qkey = (keys >= shared_keys) & key_in
            diag_mask = is_qkey[:, None] & d_ok[None, :]
            do_j = tl.load(do_base + keys[:, None] * stride_dol + offs_d[None, :], mask=diag_mask, other=0.0)
            do_j = do_j.to(tl.float32)
            o_j = tl.load(o_base + keys[:, None] * stride_ol + offs_d[None, :], mask=diag_mask, other=0.0)
            dp_minus_delta = tl.sum(do_j * (v.to(tl.float32) - o_j.to(tl.float32)), 1)
            q_j = tl.load(q_base + keys[:, None] * stride_ql + offs_d[None, :], mask=diag_mask, other=0.0)
            q_j = q_j.to(tl.float32)
            lse_j = tl.load(lse_base + keys, mask=is_qkey, other=0.0)
            p = tl.math.exp2(tl.sum(q_j * k.to(tl.float32), 1) * qk_scale - lse_j)
            p = tl.where(is_qkey, p, 0.0)
            dv += p[:, None] * do_j
            dk += (p * dp_minus_delta)[:, None] * q_j

    dk_ptrs = dk_base + keys[:, None] * stride_dkl + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(dk_base.dtype.element_ty), mask=kv_mask)
    dv_ptrs = dv_base + keys[:, None] * stride_dvl + offs_d[None, :]
    tl.store(dv_ptrs, dv.to(dv_base.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_program(
    q_base,
    k_base,
    v_base,
    o_base,
    do_base,
    lse_base,
    dq_base,
    stride_ql,
    stride_kl,
    stride_vl,
    stride_ol,
    stride_dol,
    stride_dql,
    start_m,
    seq_len,
    shared_keys,
    query_key_start,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUERY_SELF: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_OWN: tl.constexpr,
    BLOCK_STEP: tl.constexpr,
):
    """dQ of the row block at ``start_m``, looping over the key blocks it sees."""
    offs_m = start_m + tl.arange(0, BLOCK_OWN)
    offs_n = tl.arange(0, BLOCK_STEP)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seq_len
    row_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dol + offs_d[None, :], mask=row_mask, other=0.0)
    o = tl.load(o_base + offs_m[:, None] * stride_ol + offs_d[None, :], mask=row_mask, other=0.0)
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    is_query = offs_m >= shared_keys
    row_start = tl.where(is_query, query_key_start, 0)
    dq = tl.zeros([BLOCK_OWN, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi = _key_range(start_m, shared_keys, query_key_start, BLOCK_OWN, BLOCK_STEP)
    for start_n in range(lo, shared_keys, BLOCK_STEP):
        keys = start_n + offs_n
        key_ok = keys < shared_keys
        kv_mask = d_ok[:, None] & key_ok[None, :]
        kT = tl.load(k_base + keys[None, :] * stride_kl + offs_d[:, None], mask=kv_mask, other=0.0)
        vT = tl.load(v_base + keys[None, :] * stride_vl + offs_d[:, None], mask=kv_mask, other=0.0)
        p = tl.math.exp2(tl.dot(q, kT, input_precision=PRECISION) * qk_scale - lse[:, None])
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if (start_n < full_lo) | (start_n >= full_hi):
            # dS, not only P: a hidden key's inf/NaN V makes dP non-finite there. Its K enters the dQ
            # product below, so a prefix key hidden from the query rows is cleared there (raw rows
            # that see it get NaN through their own dS).
            ds = tl.where((keys[None, :] >= row_start[:, None]) & key_ok[None, :], ds, 0.0)
            if start_n < query_key_start:
                kT, _ = _clear_hidden_prefix(kT, keys, query_key_start, 1)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)

    if QUERY_SELF:
        has_self = is_query & row_ok
        self_mask = has_self[:, None] & d_ok[None, :]
        k_self = tl.load(k_base + offs_m[:, None] * stride_kl + offs_d[None, :], mask=self_mask, other=0.0)
        v_self = tl.load(v_base + offs_m[:, None] * stride_vl + offs_d[None, :], mask=self_mask, other=0.0)
        k_self = k_self.to(tl.float32)
        p = tl.math.exp2(tl.sum(q.to(tl.float32) * k_self, 1) * qk_scale - lse)
        p = tl.where(has_self, p, 0.0)
        ds = p * (tl.sum(do.to(tl.float32) * v_self.to(tl.float32), 1) - delta)
        dq += ds[:, None] * k_self

    dq_ptrs = dq_base + offs_m[:, None] * stride_dql + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(dq_base.dtype.element_ty), mask=row_mask)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def _bwd_fused_kernel(
    Q,
    K,
    V,
    O,
    DO,
    LSE,
    DQ,
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
    stride_ob,
    stride_oh,
    stride_ol,
    stride_dob,
    stride_doh,
    stride_dol,
    stride_dqb,
    stride_dqh,
    stride_dql,
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
    seq_bucket,
    qk_scale,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUERY_SELF: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_OWN: tl.constexpr,
    BLOCK_STEP: tl.constexpr,
):
    """One launch for the whole backward: per head, ``n`` dK/dV programs then ``n`` dQ programs."""
    blocks = tl.cdiv(seq_len, BLOCK_OWN)
    pid = tl.program_id(0)
    bh = (pid // (2 * blocks)).to(tl.int64)
    task = pid % (2 * blocks)
    b = bh // num_heads
    h = bh % num_heads
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + bh * seq_len
    if task < blocks:
        _dkdv_program(
            q_base,
            k_base,
            v_base,
            o_base,
            do_base,
            lse_base,
            DK + b * stride_dkb + h * stride_dkh,
            DV + b * stride_dvb + h * stride_dvh,
            stride_ql,
            stride_kl,
            stride_vl,
            stride_ol,
            stride_dol,
            stride_dkl,
            stride_dvl,
            task * BLOCK_OWN,
            seq_len,
            shared_keys,
            query_key_start,
            qk_scale,
            sm_scale,
            HEAD_DIM,
            BLOCK_D,
            QUERY_SELF,
            PRECISION,
            BLOCK_OWN,
            BLOCK_STEP,
        )
    else:
        _dq_program(
            q_base,
            k_base,
            v_base,
            o_base,
            do_base,
            lse_base,
            DQ + b * stride_dqb + h * stride_dqh,
            stride_ql,
            stride_kl,
            stride_vl,
            stride_ol,
            stride_dol,
            stride_dql,
            (task - blocks) * BLOCK_OWN,
            seq_len,
            shared_keys,
            query_key_start,
            qk_scale,
            sm_scale,
            HEAD_DIM,
            BLOCK_D,
            QUERY_SELF,
            PRECISION,
            BLOCK_OWN,
            BLOCK_STEP,
        )
