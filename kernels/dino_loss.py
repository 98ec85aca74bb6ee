"""Row operations of the DINO loss, run on one chunk of ``[rows, K]`` logits at a time.

``dino_teacher_probs``: the teacher's centred, sharpened softmax ``softmax((z - c) / T)``.
``dino_soft_cross_entropy_``: each student row's soft cross-entropy ``-sum q log_softmax(z / T)``
against a target row ``q`` (a teacher distribution, or the sum of two), with the gradient w.r.t.
``z / T`` written in place of the logits, so no second ``[rows, K]`` buffer is needed (Liger-Kernel's
trick). ``adclr.fused_loss`` runs the matmuls of the head's last layer around them, chunk by chunk.

Backends: ``torch`` (chunk-sized PyTorch ops, any device and dtype) and ``triton`` (one fused row
kernel, CUDA or ``TRITON_INTERPRET=1``); ``auto`` picks from ``AUTO_BACKEND`` by device.
"""

from __future__ import annotations

import torch

from ..choices import LOSS_BACKENDS
from . import device

# ``auto``'s choice per device type. The Triton rows read the logits and targets twice and write the
# gradient once; the PyTorch rows make about ten passes over chunk-sized fp32 temporaries. Which is
# faster on a GPU has not been measured yet: ``python -m bench.train_step --loss_backend {triton,torch}``
# is the place to decide.
AUTO_BACKEND = {"cuda": "triton"}
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _bf16_before_sm80(logits: torch.Tensor) -> bool:
    return logits.dtype == torch.bfloat16 and not device.supports_bf16(device.capability(logits.device))


def resolve_loss_backend(backend: str, logits: torch.Tensor) -> str:
    """The backend that runs ``logits``: ``auto`` resolved, and ``triton`` refused where it cannot run."""
    if backend not in LOSS_BACKENDS:
        raise ValueError(f"backend must be one of {LOSS_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = AUTO_BACKEND.get(logits.device.type, "torch")
        triton_ok = logits.dtype in TRITON_DTYPES and not _bf16_before_sm80(logits)
        return backend if backend == "torch" or triton_ok else "torch"
    if backend == "triton":
        if _bf16_before_sm80(logits):
            raise TypeError("backend='triton' needs sm80+ for bfloat16; use float16/float32 or backend='torch'")
        if logits.device.type != "cuda" and not device.interpreter_enabled():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got device "
                f"{logits.device}; use backend='torch' or 'auto'"
            )
        if logits.dtype not in TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports logits of dtype {TRITON_DTYPES}, got {logits.dtype}")
    return backend


def _check_rows(name: str, t, K: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2 or not t.is_floating_point():
        raise ValueError(f"{name} must be a 2-D floating-point [rows, K] tensor, got {t.dtype} {tuple(t.shape)}")
    if K is not None and t.shape[1] != K:
        raise ValueError(f"{name} must have K = {K} columns, got {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit-stride rows (stride(1) == 1), got strides {t.stride()}")


def _check_out(name: str, out, shape: tuple, like: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or tuple(out.shape) != shape:
        got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name} must be a float32 tensor of shape {shape}, got {got}")
    if out.device != like.device or (len(shape) == 2 and shape[1] > 1 and out.stride(1) != 1):
        raise ValueError(f"{name} must be on {like.device} with unit-stride rows")


def _check_temp(name: str, temp) -> float:
    if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not temp > 0:
        raise ValueError(f"{name} must be a float > 0, got {temp!r}")
    return float(temp)


def dino_teacher_probs(
    logits: torch.Tensor, center: torch.Tensor, temp: float, *, out: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """``softmax((logits - center) / temp)`` over K, in fp32: ``logits [R, K]``, ``center [K]`` -> ``[R, K]``."""
    _check_rows("logits", logits)
    R, K = logits.shape
    temp = _check_temp("temp", float(temp))
    if not isinstance(center, torch.Tensor) or center.numel() != K or center.device != logits.device:
        raise ValueError(f"center must be a tensor of K = {K} elements on {logits.device}")
    center = center.reshape(K).float().contiguous()
    if out is None:
        out = torch.empty(R, K, dtype=torch.float32, device=logits.device)
    _check_out("out", out, (R, K), logits)
    if R == 0:
        return out
    if resolve_loss_backend(backend, logits) == "triton":
        from .triton_dino_loss import triton_teacher_probs

        return triton_teacher_probs(logits, center, temp, out)
    torch.sub(logits if logits.dtype in TRITON_DTYPES else logits.float(), center, out=out)
    out.div_(temp)
    out.sub_(out.amax(dim=1, keepdim=True)).exp_()
    return out.div_(out.sum(dim=1, keepdim=True))


def dino_soft_cross_entropy_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    target_index: torch.Tensor,
    temp: float,
    *,
    loss_out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-row soft cross-entropy of student ``logits [R, K]`` against ``targets[target_index] [R, K]``.

    Returns the losses ``-sum_k q_k log_softmax(logits / temp)_k`` (fp32 ``[R]``) and overwrites
    ``logits`` with ``sum(q) softmax(logits / temp) - q``, the gradient of each row's
    loss w.r.t. ``logits / temp`` (divide by ``temp`` for the logits' own). ``targets`` is fp32 and
    ``target_index`` (int32/int64, one per row) must lie in ``[0, len(targets))``: it is not checked
    on the device, to keep the hot path free of host synchronisation.
    """
    _check_rows("logits", logits)
    R, K = logits.shape
    _check_rows("targets", targets, K)
    if targets.dtype != torch.float32 or targets.device != logits.device:
        raise ValueError(f"targets must be float32 on {logits.device}, got {targets.dtype} on {targets.device}")
    if (
        not isinstance(target_index, torch.Tensor)
        or target_index.dtype not in (torch.int32, torch.int64)
        or tuple(target_index.shape) != (R,)
        or target_index.device != logits.device
    ):
        raise ValueError(f"target_index must be an int32/int64 tensor of shape ({R},) on {logits.device}")
    temp = _check_temp("temp", float(temp))
    if loss_out is None:
        loss_out = torch.empty(R, dtype=torch.float32, device=logits.device)
    _check_out("loss_out", loss_out, (R,), logits)
    if R == 0:
        return loss_out
    if resolve_loss_backend(backend, logits) == "triton":
        from .triton_dino_loss import triton_soft_cross_entropy_

        return triton_soft_cross_entropy_(logits, targets, target_index.contiguous(), temp, loss_out)
    s = logits.float().div(temp)
    s.sub_(s.amax(dim=1, keepdim=True))  # shifted first: exp(s - max) / sum keeps the bits that s - lse loses
    log_sum = torch.logsumexp(s, dim=1, keepdim=True)
    q = targets.index_select(0, target_index)
    torch.sum(q * (log_sum - s), dim=1, out=loss_out)
    s.exp_().div_(log_sum.exp()).mul_(q.sum(dim=1, keepdim=True)).sub_(q)
    logits.copy_(s)
    return loss_out
