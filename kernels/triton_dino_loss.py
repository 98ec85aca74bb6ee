"""The DINO loss's row operations in Triton (Liger-Kernel's cross-entropy pattern).

Tiers: ``@triton.jit`` kernels -> launchers (``triton_teacher_probs`` / ``triton_soft_cross_entropy_``);
the checks and the choice of backend live in ``dino_loss.py``, the chunked matmuls around these rows
in ``adclr.fused_loss``. One program per row streams the K logits in ``BLOCK_K`` blocks twice: an
online max / sum-of-exponentials pass for the log-sum-exp, then a pass that writes the output. All
arithmetic is fp32 whatever the logits' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_K, num_warps) by K: a row is one program, so a block spans as many logits as the warps can
# hold without spilling. Unmeasured on GPUs; the benchmark (bench/train_step.py) is where to tune it.
_MAX_BLOCK_K = 4096


def _launch_config(K: int) -> tuple[int, int]:
    block = min(_MAX_BLOCK_K, triton.next_power_of_2(K))
    return block, 8 if block >= 2048 else 4


@triton.jit
def _teacher_probs_kernel(Z, CENTER, P, stride_z, stride_p, K, temp, BLOCK_K: tl.constexpr):
    """``P[r] = softmax((Z[r] - CENTER) / temp)``."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    p_row = P + row * stride_p
    offs = tl.arange(0, BLOCK_K)
    m = float("-inf")
    l = 0.0
    for start in range(0, K, BLOCK_K):
        cols = start + offs
        ok = cols < K
        z = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32)
        c = tl.load(CENTER + cols, mask=ok, other=0.0)
        x = tl.where(ok, (z - c) / temp, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    for start in range(0, K, BLOCK_K):
        cols = start + offs
        ok = cols < K
        z = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32)
        c = tl.load(CENTER + cols, mask=ok, other=0.0)
        shifted = tl.where(ok, (z - c) / temp - m, 0.0)  # masked lanes stay finite
        tl.store(p_row + cols, tl.exp(shifted) / l, mask=ok)


@triton.jit
def _soft_cross_entropy_kernel(Z, TARGETS, INDEX, LOSS, stride_z, stride_t, K, temp, BLOCK_K: tl.constexpr):
    """Row r with target q = TARGETS[INDEX[r]] and s = Z[r] / temp: ``LOSS[r] = -sum q log_softmax(s)``
    and, in place of ``Z[r]``, ``sum(q) softmax(s) - q`` (the gradient w.r.t. s)."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    t_row = TARGETS + tl.load(INDEX + row).to(tl.int64) * stride_t
    offs = tl.arange(0, BLOCK_K)
    m = float("-inf")
    l = 0.0
    mass = 0.0  # sum of q: 1 for one teacher view, 2 for the sum of both
    for start in range(0, K, BLOCK_K):
        cols = start + offs
        ok = cols < K
        s = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32) / temp
        x = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
        mass += tl.sum(tl.load(t_row + cols, mask=ok, other=0.0), 0)
    # With the max known, every term is formed from s - m: with |s| ~ 100 (sharp temperatures), the
    # unshifted forms (m + log l) * mass - sum(q s) and exp(s - lse) would lose several bits.
    log_l = tl.log(l)
    mass_over_l = mass / l
    loss = 0.0
    for start in range(0, K, BLOCK_K):
        cols = start + offs
        ok = cols < K
        shifted = tl.where(ok, tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32) / temp - m, 0.0)
        q = tl.load(t_row + cols, mask=ok, other=0.0)
        loss += tl.sum(q * (log_l - shifted), 0)
        grad = tl.exp(shifted) * mass_over_l - q
        tl.store(z_row + cols, grad.to(Z.dtype.element_ty), mask=ok)
    tl.store(LOSS + row, loss)


def triton_teacher_probs(logits: torch.Tensor, center: torch.Tensor, temp: float, out: torch.Tensor) -> torch.Tensor:
    """Launcher: ``out [R, K]`` (fp32) from ``logits [R, K]`` and ``center [K]`` (fp32), rows unit-stride."""
    R, K = logits.shape
    block, warps = _launch_config(K)
    _teacher_probs_kernel[(R,)](
        logits, center, out, logits.stride(0), out.stride(0), K, float(temp), BLOCK_K=block, num_warps=warps
    )
    return out


def triton_soft_cross_entropy_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    index: torch.Tensor,
    temp: float,
    loss_out: torch.Tensor,
) -> torch.Tensor:
    """Launcher: per-row losses into ``loss_out [R]`` (fp32) and the gradient into ``logits`` itself."""
    R, K = logits.shape
    block, warps = _launch_config(K)
    _soft_cross_entropy_kernel[(R,)](
        logits,
        targets,
        index,
        loss_out,
        logits.stride(0),
        targets.stride(0),
        K,
        float(temp),
        BLOCK_K=block,
        num_warps=warps,
    )
    return loss_out
