"""Public entry points: ``adclr_attention`` (``[B, H, L, D]``) and ``adclr_attention_packed`` (qkv).

Inputs are checked here, before any kernel runs, and the backend is chosen. ``auto``: exact SDPA
off CUDA, below sm80, for float64 and with dropout; on CUDA sm80+ the fastest exact path this GPU's
tuned table measured for the call's head dim, sequence bucket, dtype, mask kind and mode (forward
only, or forward + backward when a gradient is needed), which may be SDPA. Without a table entry:
the fused Triton kernel for the ADCLR masks at padded head dim <= 64 in fp16/bf16 (what its built-in
tiles were sized for; forward + backward only up to L = 512), SDPA for everything else: the ``full``
mask (every call without query tokens, where SDPA is one FlashAttention call computing the same
function), head dims above 64, fp32, and training at L > 512.
``triton`` forces the fused kernel wherever it can run; ``reference`` is the explicit (slow) form.
"""

from __future__ import annotations

import functools
import math

import torch

from ..choices import ATTN_BACKENDS as BACKENDS
from . import device, plans
from .layout import AttentionLayout
from .reference import reference_attention
from .sdpa import sdpa_attention

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_TRITON_HEAD_DIM = 256
MAX_TRITON_HEAD_DIM_FP32 = 128  # fp32 tiles beyond this exceed sm80's shared memory or spill kilobytes


def triton_is_default(target: torch.device) -> bool:
    """Whether ``backend="auto"`` may pick the Triton kernel for tensors on ``target`` (CUDA sm80+ with
    Triton, ``device.fused_kernel_supported``); which calls it does pick it for is
    ``plans.auto_backend``'s decision."""
    return device.fused_kernel_supported(target)


def _auto_choice(t: torch.Tensor, head_dim: int, layout: AttentionLayout, needs_grad: bool) -> str:
    """``triton`` / ``sdpa``: this GPU's tuned table for the call's key, else the untuned default."""
    mode = "fwd+bwd" if needs_grad else "fwd"
    return plans.auto_backend(device.table_key(t.device), layout.length, head_dim, t.dtype, layout.kernel_params, mode)


def _check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_layout(layout, length: int, what: str) -> None:
    if not isinstance(layout, AttentionLayout):
        raise TypeError(f"layout must be an adclr.kernels.AttentionLayout, got {type(layout).__name__}")
    if layout.length != length:
        raise ValueError(
            f"{what} has sequence length {length} but layout describes L = num_raw + num_query = "
            f"{layout.num_raw} + {layout.num_query} = {layout.length}"
        )


def _resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be None or a finite float > 0, got {scale!r}")
    return float(scale)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have dtype in {SUPPORTED_DTYPES}, got {t.dtype}")


def _check_sizes(name: str, t: torch.Tensor, seq_dim: int) -> None:
    """A head dim and a sequence length of at least 1 (an empty one has no softmax, and ``D**-0.5`` no value)."""
    if t.shape[-1] < 1:
        raise ValueError(f"{name} must have head dim D >= 1, got shape {tuple(t.shape)}")
    if t.shape[seq_dim] < 1:
        raise ValueError(f"{name} must have sequence length L >= 1, got shape {tuple(t.shape)}")


def _check_dropout(dropout_p) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def _resolve_backend(
    backend: str, t: torch.Tensor, head_dim: int, dropout_p: float, layout: AttentionLayout, needs_grad: bool
) -> str:
    """Pick the backend for ``auto`` and reject requests the Triton kernel cannot serve."""
    if backend == "auto":
        fused = (
            triton_is_default(t.device)
            and t.dtype != torch.float64
            and dropout_p == 0
            and head_dim <= MAX_TRITON_HEAD_DIM
            and not (t.dtype == torch.float32 and head_dim > MAX_TRITON_HEAD_DIM_FP32)
        )
        return _auto_choice(t, head_dim, layout, needs_grad) if fused else "sdpa"
    if backend == "triton":
        if dropout_p > 0:
            raise ValueError(f"backend='triton' does not implement attention dropout, got dropout_p={dropout_p}")
        if t.device.type != "cuda" and not device.interpreter_enabled():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got device "
                f"{t.device}; use backend='sdpa' or 'auto'"
            )
        if t.dtype == torch.float64:
            raise TypeError("backend='triton' supports float16, bfloat16 and float32, got torch.float64")
        if head_dim > MAX_TRITON_HEAD_DIM:
            raise ValueError(f"backend='triton' supports head dims up to {MAX_TRITON_HEAD_DIM}, got {head_dim}")
        if t.dtype == torch.float32 and head_dim > MAX_TRITON_HEAD_DIM_FP32:
            raise ValueError(
                f"backend='triton' supports float32 head dims up to {MAX_TRITON_HEAD_DIM_FP32}, got "
                f"{head_dim}; use float16/bfloat16 or backend='sdpa'"
            )
        if t.dtype == torch.bfloat16 and not device.supports_bf16(device.capability(t.device)):
            raise TypeError("backend='triton' needs sm80+ for bfloat16; use float16/float32 or backend='sdpa'")
    elif backend not in ("sdpa", "reference"):  # a name set on a layer past set_attn_backend's check
        _check_backend(backend)
    return backend


def _resolve_call(
    backend, dropout_p, scale, t: torch.Tensor, layout, length: int, what: str, needs_grad: bool
) -> tuple[str, float]:
    """The checks and choices both entry points share: ``(backend to run, scale)``."""
    _check_backend(backend)
    _check_dropout(dropout_p)
    _check_layout(layout, length, what)
    head_dim = t.shape[-1]
    return _resolve_backend(backend, t, head_dim, dropout_p, layout, needs_grad), _resolve_scale(scale, head_dim)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@functools.cache
def _triton_ops():
    """``kernels.triton_attention``, imported on the first Triton call (it needs Triton installed)."""
    from . import triton_attention

    return triton_attention


def _attend(q, k, v, layout: AttentionLayout, scale: float, dropout_p: float, backend: str) -> torch.Tensor:
    """``[B, H, L, D]`` attention on a resolved backend (``triton``, ``sdpa`` or ``reference``)."""
    if backend == "triton":
        return _triton_ops().triton_attention(q, k, v, layout, scale)
    attend = sdpa_attention if backend == "sdpa" else reference_attention
    return attend(q, k, v, layout, scale, dropout_p)


def _attend_packed(qkv, layout: AttentionLayout, scale: float, dropout_p: float, backend: str) -> torch.Tensor:
    """Packed attention on a resolved backend; returns ``[B, L, H, D]``."""
    if backend == "triton":
        return _triton_ops().triton_attention_packed(qkv, layout, scale)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    attend = sdpa_attention if backend == "sdpa" else reference_attention
    return attend(q, k, v, layout, scale, dropout_p).transpose(1, 2)


def adclr_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: AttentionLayout,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """ADCLR attention of ``q, k, v`` (each ``[B, H, L, D]``) under ``layout``; returns ``[B, H, L, D]``.

    ``dropout_p`` drops attention weights (sdpa and reference backends only; pass 0 at eval time).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on the same device, got {q.device}, {k.device}, {v.device}")
    _check_sizes("q, k, v", q, seq_dim=2)
    needs_grad = _needs_grad(q, k, v)
    backend, scale = _resolve_call(backend, dropout_p, scale, q, layout, q.shape[2], "q", needs_grad)
    return _attend(q, k, v, layout, scale, dropout_p, backend)


def adclr_attention_packed(
    qkv: torch.Tensor,
    layout: AttentionLayout,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """ADCLR attention of a ViT's packed projection ``qkv`` ``[B, L, 3, H, D]``; returns ``[B, L, H, D]``.

    The Triton backend reads q, k, v straight out of ``qkv`` and writes ``[B, L, H, D]`` directly, so
    neither the split nor the output projection's input needs a transpose copy.
    """
    _check_tensor("qkv", qkv)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be 5-D [B, L, 3, H, D], got shape {tuple(qkv.shape)}")
    _check_sizes("qkv", qkv, seq_dim=1)
    needs_grad = torch.is_grad_enabled() and qkv.requires_grad
    backend, scale = _resolve_call(backend, dropout_p, scale, qkv, layout, qkv.shape[1], "qkv", needs_grad)
    return _attend_packed(qkv, layout, scale, dropout_p, backend)


# --------------------------------------------------------------------------------------------------
# The model's path. ``adclr.model``'s attention module calls these once per block and call: its
# backend name was checked once (by the config and ``set_attn_backend``), its qkv comes from its own
# projection (5-D, [B, L, 3, H, D], a float dtype), its scale is head_dim ** -0.5. So the name, shape
# and scale checks of the public API are not repeated; the layout's length is (one comparison: a
# layout longer than the tensors would have the kernel read past them), and what depends on the
# tensors (``auto``'s choice, what ``triton`` can run) is resolved per call.
# --------------------------------------------------------------------------------------------------


def model_attention_packed(
    qkv: torch.Tensor, layout: AttentionLayout, scale: float, dropout_p: float, backend: str
) -> torch.Tensor:
    """``adclr_attention_packed`` for the model's trusted arguments (see above)."""
    if layout.length != qkv.shape[1]:
        _check_layout(layout, qkv.shape[1], "qkv")
    needs_grad = torch.is_grad_enabled() and qkv.requires_grad
    backend = _resolve_backend(backend, qkv, qkv.shape[4], dropout_p, layout, needs_grad)
    return _attend_packed(qkv, layout, scale, dropout_p, backend)


def model_attention(q, k, v, layout: AttentionLayout, scale: float, dropout_p: float, backend: str) -> torch.Tensor:
    """``adclr_attention`` for the model's trusted arguments (q and k after its q/k norms)."""
    if not q.dtype == k.dtype == v.dtype:  # q/k norms may run in fp32 under autocast while v does not
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if layout.length != q.shape[2]:
        _check_layout(layout, q.shape[2], "q")
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    backend = _resolve_backend(backend, q, q.shape[3], dropout_p, layout, needs_grad)
    return _attend(q, k, v, layout, scale, dropout_p, backend)
