"""Fused ADCLR attention in Triton: raw self-attention and query->raw cross-attention in one pass.

Tiers (as in Liger-Kernel): ``@triton.jit`` kernels (``triton_v2.py``) -> launchers
(``forward_launches`` / ``backward_launches``) -> ``torch.autograd.Function``: in eager mode the
lean ``EagerAttention[Packed]`` (the launchers called directly), while ``torch.compile`` traces
``TritonADCLRAttention[Packed]`` over ``torch.library`` custom ops (opaque to the compiler).

The block structure comes from ``AttentionLayout.kernel_params`` = ``(S, Q0, SELF)``: rows ``< S``
see keys ``[0, S)``; rows ``>= S`` (query tokens) see ``[Q0, S)`` plus, when ``SELF``, their own key.
Key loops cover only ``[0, S)`` and mask only boundary blocks; the ``+self`` diagonal is one extra
logit per query row; no query-token K/V tile is ever loaded. Softmax runs online in fp32 with exp2;
the forward saves the base-2 log-sum-exp, which every backward variant reads. Which variant and tiles
run is decided by ``plans.resolve_plan`` (tuned table of this GPU, else built-in defaults) once per
shape key and carried from a call's forward to its backward (``CallContext``).
``ADCLR_AUTOTUNE=1`` has Triton's autotuner pick the tiles instead, for padded head dims <= 64 in
fp16/bf16 only (where its candidates are spill-free); other calls keep the table tiles.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import triton

from . import device, plans, triton_v2
from .layout import AttentionLayout

LOG2E = 1.4426950408889634
MAX_PROGRAMS = 2**31 - 1  # one grid axis


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def _autotune_configs(tiles):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


def _fused_configs(tiles):
    return [triton.Config({"BLOCK_OWN": m, "BLOCK_STEP": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


# ADCLR_AUTOTUNE=1: the autotuner picks tiles once per (head dim, rule, dtype, sequence bucket) instead of
# the tables; it tries the first few of the tuner's candidates. Those are spill-free on sm90/sm80 only at
# padded head dim <= 64 in fp16/bf16, so only such calls autotune (``plans.autotunes``); every other call
# keeps the table tiles.
_AUTOTUNE_KEY = ["BLOCK_D", "QUERY_SELF", "seq_bucket"]
_AUTOTUNE_COUNT = 3
_AUTOTUNED = {
    "v2_fwd": triton.autotune(
        _autotune_configs(dataclasses.astuple(t) for t in plans.FWD_CANDIDATES[:_AUTOTUNE_COUNT]), key=_AUTOTUNE_KEY
    )(triton_v2._fwd_kernel),
    "fused": triton.autotune(
        _fused_configs(dataclasses.astuple(t) for t in plans.FUSED_CANDIDATES[:_AUTOTUNE_COUNT]), key=_AUTOTUNE_KEY
    )(triton_v2._bwd_fused_kernel),
}


@dataclasses.dataclass
class Launch:
    """One kernel launch, built apart from running it so that ``bench/compile_check.py`` compiles
    exactly the arguments a real call passes (and so specialises to)."""

    name: str
    kernel: object  # a JITFunction, or an Autotuner when ``tiles`` is None
    grid: tuple | Callable
    args: tuple
    constexprs: dict
    tiles: plans.Tiles | None

    def launch_kwargs(self) -> dict:
        if self.tiles is None:
            return dict(self.constexprs)
        return {**self.constexprs, "num_warps": self.tiles.num_warps, "num_stages": self.tiles.num_stages}

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.launch_kwargs())


def dot_precision(dtype: torch.dtype, capability: tuple[int, int] | None) -> str:
    """``tl.dot``'s input precision. fp16/bf16 use the tensor cores as they are. fp32 keeps fp32
    accuracy: three TF32 products (``tf32x3``) on sm80+, exact FMA (``ieee``) below sm80 (no TF32)
    and under the interpreter (``capability`` None). Plain ``ieee`` on sm80+ would spill kilobytes."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32x3" if device.supports_tf32(capability) else "ieee"


@functools.lru_cache(maxsize=256)
def _dims_of(head_dim: int, dtype: torch.dtype, query_self: bool, capability) -> dict:
    """The constexprs every kernel of a call shares."""
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=plans.block_d(head_dim),
        QUERY_SELF=query_self,
        PRECISION=dot_precision(dtype, capability),
    )


def _check_grid(programs: int) -> int:
    if programs > MAX_PROGRAMS:
        raise ValueError(f"B * H * blocks = {programs} exceeds the {MAX_PROGRAMS} programs of one grid axis")
    return programs


@functools.lru_cache(maxsize=1024)
def _bucket_index(seq_len: int) -> int:
    return plans.BUCKET_NAMES.index(plans.seq_bucket(seq_len))


# The kernel and constexprs of a launch depend on the call's key only, not on its tensors: decided once
# per key (cached) and shared by every Launch of that key, which must not change them.


@functools.lru_cache(maxsize=1024)
def _fwd_spec(head_dim: int, dtype: torch.dtype, params, tiles, capability) -> tuple[object, dict]:
    _, query_key_start, query_self = params
    dims = {**_dims_of(head_dim, dtype, query_self, capability), "HIDDEN_PREFIX": query_key_start > 0}
    if tiles is None:
        return _AUTOTUNED["v2_fwd"], dims
    return triton_v2._fwd_kernel, {**dims, "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n}


@functools.lru_cache(maxsize=1024)
def _bwd_spec(variant: str, seq_len: int, head_dim: int, dtype: torch.dtype, params, tiles, capability):
    """``(kernel, constexprs, tiles)`` of the backward ``variant``."""
    _, query_key_start, query_self = params
    dims = _dims_of(head_dim, dtype, query_self, capability)
    if variant == "short":
        if not plans.short_eligible(seq_len, head_dim):
            raise ValueError(f"the short backward cannot hold L = {seq_len}, head dim {head_dim} in one tile")
        block = dict(BLOCK_L=plans.short_block(seq_len), HIDDEN_KEYS=query_key_start > 0 or query_self)
        return triton_v2._bwd_short_kernel, {**dims, **block}, tiles or plans.short_tiles(seq_len, head_dim)
    if tiles is None:
        return _AUTOTUNED["fused"], dims, None
    return triton_v2._bwd_fused_kernel, {**dims, "BLOCK_OWN": tiles.block_m, "BLOCK_STEP": tiles.block_n}, tiles


def _bhl_strides(tensors, seq_major: bool) -> list[int]:
    """The (batch, head, sequence) strides of each of ``tensors``: ``[B, H, L, D]`` views, or
    ``[B, L, H, D]`` ones when ``seq_major`` (a packed qkv's split, the output a ViT block consumes)."""
    out = []
    for t in tensors:
        batch, second, third = t.stride()[:3]
        out += (batch, third, second) if seq_major else (batch, second, third)
    return out


def forward_launches(
    q, k, v, o, lse, params, scale: float, plan: plans.Plan, capability, seq_major: bool = False
) -> list[Launch]:
    """The launches that write ``o`` and the base-2 log-sum-exp ``lse`` (fp32 ``[B*H, L]``). The
    tensors are ``[B, H, L, D]`` views, or ``[B, L, H, D]`` ones when ``seq_major`` (the same kernel
    arguments: only the order the strides are read in differs). ``capability`` None means the CPU
    interpreter."""
    if seq_major:
        batch, seq_len, heads, head_dim = q.shape
    else:
        batch, heads, seq_len, head_dim = q.shape
    kernel, constexprs = _fwd_spec(head_dim, q.dtype, params, plan.fwd_tiles, capability)
    args = (q, k, v, o, lse, *_bhl_strides((q, k, v, o), seq_major))
    args += (heads, seq_len, params[0], params[1], _bucket_index(seq_len), scale * LOG2E)
    grid = lambda meta: (_check_grid(triton.cdiv(seq_len, meta["BLOCK_M"]) * batch * heads),)  # noqa: E731
    return [Launch("v2_fwd", kernel, grid, args, constexprs, plan.fwd_tiles)]


def backward_launches(
    do, q, k, v, o, lse, dq, dk, dv, params, scale, plan: plans.Plan, capability, seq_major: bool = False
) -> list[Launch]:
    """The launches that write dQ, dK, dV for the forward that produced ``o`` and ``lse``; tensors
    as in ``forward_launches``. The short backward does not read ``o`` (None will do)."""
    shared_keys, query_key_start, _ = params
    if seq_major:
        batch, seq_len, heads, head_dim = q.shape
    else:
        batch, heads, seq_len, head_dim = q.shape
    kernel, constexprs, tiles = _bwd_spec(plan.bwd, seq_len, head_dim, q.dtype, params, plan.bwd_tiles, capability)
    scalars = (heads, seq_len, shared_keys, query_key_start, _bucket_index(seq_len), scale * LOG2E, scale)
    if plan.bwd == "short":
        strides = _bhl_strides((q, k, v, do, dq, dk, dv), seq_major)  # no O: Delta comes from the tile
        args = (q, k, v, do, lse, dq, dk, dv, *strides, *scalars)
        return [Launch("short", kernel, (batch * heads,), args, constexprs, tiles)]
    strides = _bhl_strides((q, k, v, o, do, dq, dk, dv), seq_major)
    args = (q, k, v, o, do, lse, dq, dk, dv, *strides, *scalars)
    grid = lambda meta: (_check_grid(2 * triton.cdiv(seq_len, meta["BLOCK_OWN"]) * batch * heads),)  # noqa: E731
    return [Launch("fused", kernel, grid, args, constexprs, tiles)]


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _call_context(q: torch.Tensor, params) -> tuple[plans.Plan, tuple[int, int] | None]:
    """The plan and the target capability (None: the interpreter) of a call, decided once per shape
    key, device and resolution state (``plans.resolution_state``: a forced plan, ADCLR_AUTOTUNE, the
    tables read) rather than on every call."""
    _, _, seq_len, head_dim = q.shape
    index = None if _interpreting(q) else device.cuda_index(q.device)
    return _context_of(seq_len, head_dim, q.dtype, params, index, plans.resolution_state())


@functools.lru_cache(maxsize=1024)
def _context_of(seq_len: int, head_dim: int, dtype: torch.dtype, params, index, state):
    if index is None:
        return plans.resolve_plan(seq_len, head_dim, dtype, params, None), None
    gpu = torch.device("cuda", index)
    return plans.resolve_plan(seq_len, head_dim, dtype, params, device.table_key(gpu)), device.capability(gpu)


def run_launches(launches: list[Launch], target: torch.device) -> None:
    """Run ``launches`` with ``target`` as the current CUDA device: Triton launches on the current
    device (and its stream), not on the tensors', so a call on ``cuda:1`` while ``cuda:0`` is current
    would otherwise read foreign addresses."""
    if target.type != "cuda":
        for launch in launches:
            launch()
        return
    with torch.cuda.device(target):
        for launch in launches:
            launch()


def _forward(q, k, v, o, lse, shared_keys: int, query_key_start: int, query_self: bool, scale: float) -> None:
    """Write the output into ``o`` (a ``[B, H, L, D]`` view) and the base-2 log-sum-exp into ``lse``."""
    params = (shared_keys, query_key_start, query_self)
    plan, capability = _call_context(q, params)
    run_launches(forward_launches(q, k, v, o, lse, params, scale, plan, capability), q.device)


def _backward(do, q, k, v, o, lse, dq, dk, dv, shared_keys: int, query_key_start: int, query_self: bool, scale: float):
    """Write dQ, dK, dV (``[B, H, L, D]`` views) for the forward that produced ``o`` and ``lse``."""
    params = (shared_keys, query_key_start, query_self)
    plan, capability = _call_context(q, params)
    run_launches(backward_launches(do, q, k, v, o, lse, dq, dk, dv, params, scale, plan, capability), q.device)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def forward_outputs(q: torch.Tensor, seq_major: bool):
    """``(o, o_view, lse)``: ``o`` is ``[B, L, H, D]`` when ``seq_major`` (what a ViT block consumes)
    else ``[B, H, L, D]``; ``o_view`` is its ``[B, H, L, D]`` view."""
    batch, heads, seq_len, head_dim = q.shape
    if seq_major:
        o = q.new_empty((batch, seq_len, heads, head_dim))
        o_view = o.transpose(1, 2)
    else:
        o = o_view = q.new_empty((batch, heads, seq_len, head_dim))
    return o, o_view, q.new_empty((batch * heads, seq_len), dtype=torch.float32)


def gradient_outputs(q: torch.Tensor, seq_major: bool):
    """``(grads, (dq, dk, dv))``: ``grads`` is ``[B, L, 3, H, D]`` when ``seq_major`` (a packed qkv's
    gradient) else ``[3, B, H, L, D]``; the three are its ``[B, H, L, D]`` views."""
    batch, heads, seq_len, head_dim = q.shape
    if seq_major:
        grads = q.new_empty((batch, seq_len, 3, heads, head_dim))
        return grads, grads.permute(2, 0, 3, 1, 4).unbind(0)
    grads = q.new_empty((3, batch, heads, seq_len, head_dim))
    return grads, grads.unbind(0)


# --------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, so a compiled model keeps the fused kernel without a graph break.
# Eager calls skip the op's dispatch (about half the Python cost of a call; see the autograd below).
# --------------------------------------------------------------------------------------------------


def attention_fwd(
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
    o, o_view, lse = forward_outputs(q, seq_major)
    _forward(q, k, v, o_view, lse, shared_keys, query_key_start, query_self, scale)
    return o, lse


_attention_fwd_op = torch.library.custom_op("adclr::attention_fwd", mutates_args=())(attention_fwd)


@_attention_fwd_op.register_fake
def _(q, k, v, shared_keys, query_key_start, query_self, scale, seq_major):
    batch, heads, seq_len, head_dim = q.shape
    shape = (batch, seq_len, heads, head_dim) if seq_major else (batch, heads, seq_len, head_dim)
    return q.new_empty(shape), q.new_empty((batch * heads, seq_len), dtype=torch.float32)


def attention_bwd(
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
    grads, (dq, dk, dv) = gradient_outputs(q, seq_major)
    _backward(do, q, k, v, o, lse, dq, dk, dv, shared_keys, query_key_start, query_self, scale)
    return grads


_attention_bwd_op = torch.library.custom_op("adclr::attention_bwd", mutates_args=())(attention_bwd)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, shared_keys, query_key_start, query_self, scale, seq_major):
    batch, heads, seq_len, head_dim = q.shape
    shape = (batch, seq_len, 3, heads, head_dim) if seq_major else (3, batch, heads, seq_len, head_dim)
    return q.new_empty(shape)


# --------------------------------------------------------------------------------------------------
# Autograd. Eager calls use the lean functions: one call context (plan, capability, layout numbers,
# scale; decided once per shape key and cached) is the only argument besides the tensors, and the
# backward reads the plan its forward ran instead of resolving it again. While ``torch.compile``
# traces, the functions over the custom ops take plain numbers, which dynamo can trace.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CallContext:
    """What one call decides before its kernels run, carried from its forward to its backward."""

    params: tuple[int, int, bool]  # AttentionLayout.kernel_params
    scale: float
    plan: plans.Plan
    capability: tuple[int, int] | None  # None: the CPU interpreter


def call_context(t: torch.Tensor, seq_len: int, head_dim: int, params, scale: float) -> CallContext:
    """The context of a call on tensors like ``t``; one cached object per shape key, device, scale and
    resolution state, so a call allocates no Python object for it."""
    index = None if _interpreting(t) else device.cuda_index(t.device)
    return _cached_context(seq_len, head_dim, t.dtype, params, scale, index, plans.resolution_state())


@functools.lru_cache(maxsize=1024)
def _cached_context(seq_len, head_dim, dtype, params, scale, index, state) -> CallContext:
    return CallContext(params, scale, *_context_of(seq_len, head_dim, dtype, params, index, state))


def _run_forward(q, k, v, o, lse, call: CallContext, seq_major: bool = False) -> None:
    launches = forward_launches(q, k, v, o, lse, call.params, call.scale, call.plan, call.capability, seq_major)
    run_launches(launches, q.device)


def _run_backward(do, q, k, v, o, lse, dq, dk, dv, call: CallContext, seq_major: bool = False) -> None:
    launches = backward_launches(
        do, q, k, v, o, lse, dq, dk, dv, call.params, call.scale, call.plan, call.capability, seq_major
    )
    run_launches(launches, q.device)


def _packed_forward(qkv: torch.Tensor, call: CallContext):
    """``(q, k, v, o, lse)``: the ``[B, L, H, D]`` split of ``qkv``, the output ``o`` ``[B, L, H, D]``
    and the log-sum-exp the kernels wrote; no permuted view is made (``seq_major`` launches)."""
    q, k, v = qkv.unbind(2)
    batch, seq_len, heads, _ = q.shape
    o = q.new_empty(q.shape)
    lse = q.new_empty((batch * heads, seq_len), dtype=torch.float32)
    _run_forward(q, k, v, o, lse, call, seq_major=True)
    return q, k, v, o, lse


class EagerAttention(torch.autograd.Function):
    """ADCLR attention of ``q, k, v`` ``[B, H, L, D]`` (last dims contiguous) in eager mode."""

    @staticmethod
    def forward(ctx, q, k, v, call: CallContext):
        o, o_view, lse = forward_outputs(q, seq_major=False)
        _run_forward(q, k, v, o_view, lse, call)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.call = call
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        grads, (dq, dk, dv) = gradient_outputs(q, seq_major=False)
        _run_backward(_last_dim_contiguous(do), q, k, v, o, lse, dq, dk, dv, ctx.call)
        return dq, dk, dv, None


class EagerAttentionPacked(torch.autograd.Function):
    """ADCLR attention of a packed ``qkv`` ``[B, L, 3, H, D]`` (last dim contiguous) in eager mode;
    returns ``[B, L, H, D]``. Kernels read and write the packed layout through ``[B, L, H, D]``
    views, so the gradient comes back as one ``[B, L, 3, H, D]`` tensor without a copy."""

    @staticmethod
    def forward(ctx, qkv, call: CallContext):
        q, k, v, o, lse = _packed_forward(qkv, call)
        # The input's views are saved (the backward does not split qkv again); O only for a backward
        # that reads it (the short one does not).
        ctx.save_for_backward(q, k, v, lse, *(() if call.plan.bwd == "short" else (o,)))
        ctx.call = call
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, lse, *o = ctx.saved_tensors
        batch, seq_len, heads, head_dim = q.shape
        grads = q.new_empty((batch, seq_len, 3, heads, head_dim))
        dq, dk, dv = grads.unbind(2)
        do = _last_dim_contiguous(do)
        _run_backward(do, q, k, v, o[0] if o else None, lse, dq, dk, dv, ctx.call, seq_major=True)
        return grads, None


class TritonADCLRAttention(torch.autograd.Function):
    """ADCLR attention of separate ``q, k, v`` ``[B, H, L, D]`` through the custom ops (compiling)."""

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
    """ADCLR attention of a packed ``qkv`` ``[B, L, 3, H, D]`` through the custom ops (compiling);
    returns ``[B, L, H, D]``.

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
    """Fused ADCLR attention over ``[B, H, L, D]`` (inputs already validated by the caller).
    Without a gradient to track, the forward runs without an autograd function around it."""
    params = layout.kernel_params
    if torch.compiler.is_compiling():
        return TritonADCLRAttention.apply(q, k, v, *params, scale)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    call = call_context(q, q.shape[2], q.shape[3], params, scale)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return EagerAttention.apply(q, k, v, call)
    o, o_view, lse = forward_outputs(q, seq_major=False)
    _run_forward(q, k, v, o_view, lse, call)
    return o


def triton_attention_packed(qkv, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """Fused ADCLR attention of a packed ``[B, L, 3, H, D]`` qkv; returns ``[B, L, H, D]``."""
    params = layout.kernel_params
    if torch.compiler.is_compiling():
        return TritonADCLRAttentionPacked.apply(qkv, *params, scale)
    qkv = _last_dim_contiguous(qkv)
    call = call_context(qkv, qkv.shape[1], qkv.shape[4], params, scale)
    if torch.is_grad_enabled() and qkv.requires_grad:
        return EagerAttentionPacked.apply(qkv, call)
    return _packed_forward(qkv, call)[3]
