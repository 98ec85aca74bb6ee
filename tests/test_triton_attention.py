"""The fused Triton kernel against the float64 reference.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest); on a GPU they run natively and
the ``gpu``-marked cases add bf16, the real ViT shapes, huge B*H and determinism.
"""

import math

import pytest
import torch
from attention_utils import (
    KERNEL_DEVICE,
    RULES,
    assert_close_to_truth,
    layout_for,
    make_qkv,
    max_error,
    reference_with_grads,
)

from adclr.kernels import AttentionLayout, adclr_attention, adclr_attention_packed
from adclr.kernels.triton_attention import LOG2E, _backward, _forward
from bench.shapes import VIT_SHAPES

STORAGES = ("contiguous", "strided", "packed")


def inputs(batch, heads, layout, head_dim, dtype, storage, device=KERNEL_DEVICE):
    """q, k, v ``[B, H, L, D]`` as plain tensors, padded sequence-major views, or a packed qkv's views."""
    L = layout.length
    if storage == "packed":
        qkv = torch.randn(batch, L, 3, heads, head_dim, dtype=dtype, device=device)
        return list(qkv.permute(2, 0, 3, 1, 4).unbind(0))
    return make_qkv(batch, heads, L, head_dim, dtype, device, strided=storage == "strided")


def run_poisoned(q, k, v, do, layout, scale, storage):
    """Launch forward and backward into NaN-filled buffers so that any unwritten element fails."""
    B, H, L, D = q.shape
    nan = float("nan")
    if storage == "packed":  # outputs as the packed op writes them: o [B, L, H, D], grads [B, L, 3, H, D]
        o = torch.full((B, L, H, D), nan, dtype=q.dtype, device=q.device).transpose(1, 2)
        dq, dk, dv = torch.full((B, L, 3, H, D), nan, dtype=q.dtype, device=q.device).permute(2, 0, 3, 1, 4)
    else:
        o, dq, dk, dv = (torch.full_like(q, nan) for _ in range(4))
    lse = torch.full((B * H, L), nan, dtype=torch.float32, device=q.device)
    params = layout.kernel_params
    _forward(q, k, v, o, lse, *params, scale)
    _backward(do, q, k, v, o, lse, dq, dk, dv, *params, scale)
    return o, lse, (dq, dk, dv)


def check_against_reference(q, k, v, layout, scale, storage, dtype):
    do = torch.randn_like(q)
    out, lse, grads = run_poisoned(q, k, v, do, layout, scale, storage)
    truth, truth_grads = reference_with_grads(q, k, v, do, layout, scale, torch.float64)
    same_dtype, same_dtype_grads = reference_with_grads(q, k, v, do, layout, scale, dtype)
    assert_close_to_truth("out", out, truth, same_dtype, dtype)
    for name, g, t, p in zip(("dq", "dk", "dv"), grads, truth_grads, same_dtype_grads):
        assert_close_to_truth(name, g, t, p, dtype)
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    lse_truth = scores.masked_fill(~layout.dense_mask(q.device), -math.inf).logsumexp(-1) * LOG2E
    assert max_error(lse.view_as(lse_truth), lse_truth) < 1e-4 * max(1.0, lse_truth.abs().max().item())
    if not layout.query_self and not layout.bidirectional:
        R = layout.num_raw
        assert torch.count_nonzero(grads[1][:, :, R:]) == 0 and torch.count_nonzero(grads[2][:, :, R:]) == 0


def spec_cases():
    """Every rule x L x Q x P of the issue; head dims and storages rotate through the cases."""
    cases, i = [], 0
    for rule in RULES:
        for L in (1, 17, 47, 64, 130):
            for Q in (0, 1, 10):
                for P in (0, 1):
                    R = L - Q
                    if R < max(P, 1) or (rule == "raw" and P == R and Q > 0):
                        continue
                    cases.append(
                        pytest.param(rule, R, Q, P, (16, 64, 80)[i % 3], STORAGES[i % 3], id=f"{rule}-R{R}-Q{Q}-P{P}")
                    )
                    i += 1
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rule, R, Q, P, head_dim, storage", spec_cases())
def test_kernel_matches_float64_reference(rule, R, Q, P, head_dim, storage, dtype):
    layout = layout_for(rule, R, Q, P)
    q, k, v = inputs(2, 2, layout, head_dim, dtype, storage)
    check_against_reference(q, k, v, layout, head_dim**-0.5, storage, dtype)


@pytest.mark.parametrize("head_dim", [16, 32, 48, 80, 96, 128])
@pytest.mark.parametrize("rule", ["prefix+raw", "raw+self"])
def test_head_dims(head_dim, rule):
    layout = layout_for(rule, 37, 10, 1)
    q, k, v = inputs(1, 2, layout, head_dim, torch.float16, "strided")
    check_against_reference(q, k, v, layout, 0.7 / math.sqrt(head_dim), "strided", torch.float16)


@pytest.mark.parametrize("rule", RULES)
def test_public_api_autograd_both_forms(rule):
    layout = layout_for(rule, 29, 10, 1)
    qkv = torch.randn(2, layout.length, 3, 2, 32, device=KERNEL_DEVICE, requires_grad=True)
    out = adclr_attention_packed(qkv, layout, backend="triton")
    expected = adclr_attention_packed(qkv.double(), layout, backend="reference")
    assert out.shape == (2, layout.length, 2, 32)
    assert max_error(out, expected) < 1e-5
    do = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, do)
    (grad_ref,) = torch.autograd.grad(expected, qkv, do.double())
    assert max_error(grad, grad_ref) < 1e-5

    q, k, v = (t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4))
    out4 = adclr_attention(q, k, v, layout, backend="triton")
    assert max_error(out4, expected.transpose(1, 2)) < 1e-5
    grads = torch.autograd.grad(out4, (q, k, v), do.transpose(1, 2))
    assert max_error(torch.stack(grads, 2).permute(0, 3, 2, 1, 4), grad_ref) < 1e-5


def test_compiles_without_graph_break():
    """The kernel is a custom op: dynamo traces through it with fullgraph=True, forward and backward."""
    layout = AttentionLayout(21, 4, query_keys="prefix+raw+self")
    qkv = torch.randn(2, layout.length, 3, 2, 16, device=KERNEL_DEVICE, requires_grad=True)
    backend = "inductor" if KERNEL_DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(
        lambda x: adclr_attention_packed(x, layout, backend="triton").sum(), fullgraph=True, backend=backend
    )
    eager = adclr_attention_packed(qkv.double(), layout, backend="reference").sum()
    value = compiled(qkv)
    (grad,) = torch.autograd.grad(value, qkv)
    (grad_ref,) = torch.autograd.grad(eager, qkv)
    assert abs(value.item() - eager.item()) < 1e-4 and max_error(grad, grad_ref) < 1e-5


def test_fp32_attention_is_not_tf32_rounded():
    """fp32 inputs keep fp32 accuracy (no TF32 in the products): error far below TF32's ~1e-3."""
    layout = AttentionLayout(60, 10)
    q, k, v = (3 * t for t in inputs(1, 2, layout, 64, torch.float32, "contiguous"))
    out = adclr_attention(q, k, v, layout, backend="triton")
    ref = adclr_attention(q.double(), k.double(), v.double(), layout, backend="reference")
    assert max_error(out, ref) < 5e-5


# -------------------------------------------------------------------------------------------------
# GPU only
# -------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shape", list(VIT_SHAPES), ids=list(VIT_SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_real_shapes(shape, rule, dtype):
    B, H, R, Q, D = VIT_SHAPES[shape]
    layout = layout_for(rule, R, Q, 1)
    q, k, v = inputs(B, H, layout, D, dtype, "packed", device="cuda")
    check_against_reference(q, k, v, layout, D**-0.5, "packed", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("rule, R, Q, P, head_dim, storage", spec_cases())
def test_gpu_spec_cases_bf16(rule, R, Q, P, head_dim, storage):
    """The interpreter's cases again in bf16, which the interpreter cannot run (fp32/fp16 run above)."""
    layout = layout_for(rule, R, Q, P)
    q, k, v = inputs(3, 5, layout, head_dim, torch.bfloat16, storage, device="cuda")
    check_against_reference(q, k, v, layout, head_dim**-0.5, storage, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("L", [1, 197, 795, 4096])
def test_gpu_long_and_short_sequences(L):
    layout = AttentionLayout(max(L - 10, 1), min(10, L - 1), 1, "raw+self" if L > 1 else "prefix+raw")
    q, k, v = inputs(2, 3, layout, 64, torch.bfloat16, "contiguous", device="cuda")
    check_against_reference(q, k, v, layout, 0.125, "contiguous", torch.bfloat16)


@pytest.mark.gpu
def test_gpu_huge_batch_times_heads_does_not_overflow_the_grid():
    layout = AttentionLayout(37, 10)
    q, k, v = inputs(1024, 16, layout, 32, torch.float16, "packed", device="cuda")
    check_against_reference(q, k, v, layout, 32**-0.5, "packed", torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["prefix+raw", "raw+self"])
def test_gpu_backward_is_deterministic(rule):
    layout = AttentionLayout(197, 10, query_keys=rule)
    qkv = torch.randn(32, layout.length, 3, 6, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(32, layout.length, 6, 64, device="cuda", dtype=torch.bfloat16)
    first = None
    for _ in range(20):
        (grad,) = torch.autograd.grad(adclr_attention_packed(qkv, layout, backend="triton"), qkv, do)
        if first is None:
            first = grad
        assert torch.equal(grad, first), "dq/dk/dv changed between identical runs"


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_gpu_autotuned_tiles_are_correct(head_dim, monkeypatch):
    """ADCLR_AUTOTUNE=1 swaps the tile table for autotuned tiles: every candidate must be exact too."""
    monkeypatch.setenv("ADCLR_AUTOTUNE", "1")
    layout = AttentionLayout(197, 10, 1, "raw+self")
    q, k, v = inputs(16, 6, layout, head_dim, torch.bfloat16, "packed", device="cuda")
    check_against_reference(q, k, v, layout, head_dim**-0.5, "packed", torch.bfloat16)
