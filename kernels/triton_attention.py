"""Fused ADCLR attention in Triton: raw self-attention and query->raw cross-attention in one pass.

Tiers (as in Liger-Kernel): ``@triton.jit`` kernels (``triton_v2.py``) -> launchers
(``forward_launches`` / ``backward_launches``, run by ``_forward`` / ``_backward``) ->
``torch.library`` custom ops (opaque to ``torch.compile``) -> ``torch.autograd.Function``.

The block structure comes from ``AttentionLayout.kernel_params`` = ``(S, Q0, SELF)``: rows ``< S``
see keys ``[0, S)``; rows ``>= S`` (query tokens) see ``[Q0, S)`` plus, when ``SELF``, their own key.
Key loops cover only ``[0, S)`` and mask only boundary blocks; the ``+self`` diagonal is one extra
logit per query row; no query-token K/V tile is ever loaded. Softmax runs online in fp32 with exp2;
the forward saves the base-2 log-sum-exp, which every backward variant reads. Which variant and tiles
run is decided per call by ``plans.resolve_plan`` (tuned table of this GPU, else built-in defaults).
``ADCLR_AUTOTUNE=1`` has Triton's autotuner pick the tiles instead, for padded head dims <= 64 in
fp16/bf16 only (where its candidates are spill-free); other calls keep the table tiles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable

import torch
import triton

from . import plans, triton_v2
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


def _strides(t: torch.Tensor):
    """(batch, head, sequence) strides of a ``[B, H, L, D]`` view whose last dim is contiguous."""
    return t.stride()[:3]


def dot_precision(dtype: torch.dtype, capability: tuple[int, int] | None) -> str:
    """``tl.dot``'s input precision. fp16/bf16 use the tensor cores as they are. fp32 keeps fp32
    accuracy: three TF32 products (``tf32x3``) on sm80+, exact FMA (``ieee``) below sm80 (no TF32)
    and under the interpreter (``capability`` None). Plain ``ieee`` on sm80+ would spill kilobytes."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32x3" if capability is not None and capability >= (8, 0) else "ieee"


def _dims(q: torch.Tensor, query_self: bool, capability) -> dict:
    return _dims_of(q.shape[-1], q.dtype, query_self, capability)


@functools.lru_cache(maxsize=256)
def _dims_of(head_dim: int, dtype: torch.dtype, query_self: bool, capability) -> dict:
    """The constexprs every kernel of a call shares (cached: the same few per model; callers copy)."""
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


def forward_launches(q, k, v, o, lse, params, scale: float, plan: plans.Plan, capability) -> list[Launch]:
    """The launches that write ``o`` (``[B, H, L, D]`` view) and the base-2 log-sum-exp ``lse``
    (fp32 ``[B*H, L]``). ``capability`` None means the CPU interpreter."""
    shared_keys, query_key_start, query_self = params
    batch, heads, seq_len, _ = q.shape
    dims = {**_dims(q, query_self, capability), "HIDDEN_PREFIX": query_key_start > 0}
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(o))
    layout_args = (heads, seq_len, shared_keys, query_key_start)
    tiles = plan.fwd_tiles
    args = (q, k, v, o, lse, *strides, *layout_args, _bucket_index(seq_len), scale * LOG2E)
    grid = lambda meta: (_check_grid(triton.cdiv(seq_len, meta["BLOCK_M"]) * batch * heads),)  # noqa: E731
    if tiles is None:
        return [Launch("v2_fwd", _AUTOTUNED["v2_fwd"], grid, args, dict(dims), None)]
    blocks = dict(BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n)
    return [Launch("v2_fwd", triton_v2._fwd_kernel, grid, args, {**dims, **blocks}, tiles)]


def backward_launches(do, q, k, v, o, lse, dq, dk, dv, params, scale, plan: plans.Plan, capability) -> list[Launch]:
    """The launches that write dQ, dK, dV (``[B, H, L, D]`` views) for the forward that produced
    ``o`` and ``lse``."""
    shared_keys, query_key_start, query_self = params
    batch, heads, seq_len, head_dim = q.shape
    dims = _dims(q, query_self, capability)
    scalars = (heads, seq_len, shared_keys, query_key_start, _bucket_index(seq_len), scale * LOG2E, scale)
    tiles = plan.bwd_tiles
    if plan.bwd == "short":
        if not plans.short_eligible(seq_len, head_dim):
            raise ValueError(f"the short backward cannot hold L = {seq_len}, head dim {head_dim} in one tile")
        tensors = (q, k, v, do, dq, dk, dv)  # no O: Delta comes from the tile
        strides = [s for t in tensors for s in t.stride()[:3]]
        args = (q, k, v, do, lse, dq, dk, dv, *strides, *scalars)
        tiles = tiles or plans.short_tiles(seq_len, head_dim)
        block = dict(BLOCK_L=plans.short_block(seq_len), HIDDEN_KEYS=query_key_start > 0 or query_self)
        return [Launch("short", triton_v2._bwd_short_kernel, (batch * heads,), args, {**dims, **block}, tiles)]
    strides = [s for t in (q, k, v, o, do, dq, dk, dv) for s in t.stride()[:3]]
    args = (q, k, v, o, do, lse, dq, dk, dv, *strides, *scalars)
    grid = lambda meta: (_check_grid(2 * triton.cdiv(seq_len, meta["BLOCK_OWN"]) * batch * heads),)  # noqa: E731
    if tiles is None:
        return [Launch("fused", _AUTOTUNED["fused"], grid, args, dict(dims), None)]
    blocks = dict(BLOCK_OWN=tiles.block_m, BLOCK_STEP=tiles.block_n)
    return [Launch("fused", triton_v2._bwd_fused_kernel, grid, args, {**dims, **blocks}, tiles)]


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


@functools.cache
def _device_info(index: int) -> tuple[str, tuple[int, int]]:
    return torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)


def _call_context(q: torch.Tensor, params) -> tuple[plans.Plan, tuple[int, int] | None]:
    """The plan and the target capability (None: the interpreter) of a call, decided once per shape
    key, device and resolution state (``plans.resolution_state``: a forced plan, ADCLR_AUTOTUNE, the
    tables read) rather than on every call."""
    _, _, seq_len, head_dim = q.shape
    device = None
    if not _interpreting(q):
        device = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return _context_of(seq_len, head_dim, q.dtype, params, device, plans.resolution_state())


@functools.lru_cache(maxsize=1024)
def _context_of(seq_len: int, head_dim: int, dtype: torch.dtype, params, device, state):
    if device is None:
        return plans.resolve_plan(seq_len, head_dim, dtype, params, None), None
    name, capability = _device_info(device)
    return plans.resolve_plan(seq_len, head_dim, dtype, params, name), capability


def run_launches(launches: list[Launch], device: torch.device) -> None:
    """Run ``launches`` with ``device`` as the current CUDA device: Triton launches on the current
    device (and its stream), not on the tensors', so a call on ``cuda:1`` while ``cuda:0`` is current
    would otherwise read foreign addresses."""
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
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
# Eager calls skip the op's dispatch (about half the Python cost of a call) and run its body directly.
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


def _fwd(*args):
    """The forward custom op while ``torch.compile`` traces, its body otherwise."""
    return _attention_fwd_op(*args) if torch.compiler.is_compiling() else attention_fwd(*args)


def _bwd(*args):
    """The backward custom op while ``torch.compile`` traces, its body otherwise."""
    return _attention_bwd_op(*args) if torch.compiler.is_compiling() else attention_bwd(*args)


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
        o, lse = _fwd(q, k, v, *params, False)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.params = params
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        grads = _bwd(_last_dim_contiguous(do), q, k, v, o, lse, *ctx.params, False)
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
        o, lse = _fwd(q, k, v, *params, True)
        ctx.save_for_backward(qkv, o, lse)
        ctx.params = params
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, o, lse = ctx.saved_tensors
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        do = _last_dim_contiguous(do).transpose(1, 2)
        grads = _bwd(do, q, k, v, o.transpose(1, 2), lse, *ctx.params, True)
        return grads, None, None, None, None


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def triton_attention(q, k, v, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """Fused ADCLR attention over ``[B, H, L, D]`` (inputs already validated by the public API).
    Without a gradient to track, the forward runs without the autograd function around it."""
    if _needs_autograd(q, k, v) or torch.compiler.is_compiling():
        return TritonADCLRAttention.apply(q, k, v, *layout.kernel_params, scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return attention_fwd(q, k, v, *layout.kernel_params, scale, False)[0]


def triton_attention_packed(qkv, layout: AttentionLayout, scale: float) -> torch.Tensor:
    """Fused ADCLR attention of a packed ``[B, L, 3, H, D]`` qkv; returns ``[B, L, H, D]``."""
    if _needs_autograd(qkv) or torch.compiler.is_compiling():
        return TritonADCLRAttentionPacked.apply(qkv, *layout.kernel_params, scale)
    q, k, v = _last_dim_contiguous(qkv).permute(2, 0, 3, 1, 4).unbind(0)
    return attention_fwd(q, k, v, *layout.kernel_params, scale, True)[0]
