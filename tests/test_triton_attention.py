"""The fused Triton kernels against the float64 reference, every variant.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest); on a GPU they run natively and
the ``gpu``-marked cases add bf16, the real ViT shapes with each backward variant, offsets past 2**31,
determinism and the autotuner. The interpreter is slow, so the spec cases rotate storage, head dim,
query count and variant across (rule, L, P) instead of taking the full product; ``spec_cases``
checks that every variant still meets every rule, dtype, storage and P.
"""

import collections
import itertools
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

from adclr.kernels import AttentionLayout, adclr_attention, adclr_attention_packed, plans, triton_attention
from adclr.kernels.attention import model_attention, model_attention_packed
from adclr.kernels.triton_attention import LOG2E, _backward, _forward
from bench.common import VIT_SHAPES

STORAGES = ("contiguous", "strided", "packed")
T = plans.Tiles
INTERPRETER = plans.INTERPRETER_TILES
# Variants the interpreter runs: v2 forward with each backward (and tiles whose row and key blocks
# differ, which catches a kernel that confuses them).
PLANS = {
    "fused": plans.Plan("v2", INTERPRETER, "fused", INTERPRETER),
    "fused-64x16": plans.Plan("v2", T(64, 16, 1, 1), "fused", T(64, 16, 1, 1)),
    "short": plans.Plan("v2", T(16, 32, 1, 1), "short", T(0, 0, 1, 1)),
}


def plan(variant: str, seq_len: int, head_dim: int, dtype, device=KERNEL_DEVICE) -> plans.Plan:
    """``PLANS[variant]`` under the interpreter; on a GPU the same variants with the built-in GPU tiles."""
    if device != "cuda":
        return PLANS[variant]
    backward = PLANS[variant].bwd
    fwd = plans.fwd_tiles(seq_len, head_dim, dtype)
    if backward == "short":
        return plans.Plan("v2", fwd, "short", plans.short_tiles(seq_len, head_dim))
    return plans.Plan("v2", fwd, "fused", plans.fused_tiles(seq_len, head_dim, dtype))


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


def flash_formula_grads(q, k, v, do, layout, scale, dtype):
    """dq, dk, dv by FlashAttention's backward formula, dS = P * (dP - rowsum(dO * O)), computed by
    PyTorch in ``dtype``. Where a row has a single key, autograd's softmax backward is exact (dS = 0)
    while this formula rounds dP and rowsum(dO * O) apart, as every flash kernel does."""
    q, k, v, do = (t.detach().to(dtype) for t in (q, k, v, do))
    p = ((q @ k.transpose(-2, -1)) * scale).masked_fill(~layout.dense_mask(q.device), -math.inf).softmax(-1)
    ds = p * (do @ v.transpose(-2, -1) - (do * (p @ v)).sum(-1, keepdim=True))
    return ds @ k * scale, ds.transpose(-2, -1) @ q * scale, p.transpose(-2, -1) @ do


def check_against_reference(q, k, v, layout, scale, storage, dtype):
    """Run the kernels into poisoned buffers and check them (``check_results``); returns the gradients."""
    do = torch.randn_like(q)
    out, lse, grads = run_poisoned(q, k, v, do, layout, scale, storage)
    check_results(q, k, v, do, out, lse, grads, layout, scale, dtype)
    return grads


def check_results(q, k, v, do, out, lse, grads, layout, scale, dtype):
    """The tests' rule: error against float64 at most twice PyTorch's own in ``dtype`` (for the
    gradients, the larger of autograd's and the flash formula's) plus one ulp at magnitude 1; the
    base-2 log-sum-exp within 1e-4 relative; query tokens' k/v gradients exactly zero where no row
    sees them."""
    truth, truth_grads = reference_with_grads(q, k, v, do, layout, scale, torch.float64)
    same_dtype, same_dtype_grads = reference_with_grads(q, k, v, do, layout, scale, dtype)
    flash_grads = flash_formula_grads(q, k, v, do, layout, scale, dtype)
    assert_close_to_truth("out", out, truth, same_dtype, dtype)
    for name, g, t, p, f in zip(("dq", "dk", "dv"), grads, truth_grads, same_dtype_grads, flash_grads):
        assert_close_to_truth(name, g, t, max(p, f, key=lambda x: max_error(x, t)), dtype)
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    lse_truth = scores.masked_fill(~layout.dense_mask(q.device), -math.inf).logsumexp(-1) * LOG2E
    assert max_error(lse.view_as(lse_truth), lse_truth) < 1e-4 * max(1.0, lse_truth.abs().max().item())
    if not layout.query_self and not layout.bidirectional:
        R = layout.num_raw
        assert torch.count_nonzero(grads[1][:, :, R:]) == 0 and torch.count_nonzero(grads[2][:, :, R:]) == 0


def _valid(rule: str, R: int, Q: int, P: int) -> bool:
    return R >= max(P, 1) and not (rule == "raw" and P == R and Q > 0)


def _features(variant, rule, L, Q, P, storage) -> list[tuple]:
    return [(variant, rule), (variant, f"P{P}"), (variant, storage), (variant, L, Q), (variant,)]


def spec_cases():
    """Every rule x L x P with L in 1, 17, 47, 64, 130 (one token, below one block, the 96 px crop's
    47, a block boundary, past two blocks) and P in 0, 1, 5 (no prefix, CLS, CLS plus registers).
    Storage and head dim rotate; the variant and the query count Q (0, 1, 10) are chosen greedily so that every variant
    meets every rule, P, storage and (L, Q) pair as evenly as the cases allow."""
    cases, seen = [], collections.Counter()
    for i, (rule, L, P) in enumerate(itertools.product(RULES, (1, 17, 47, 64, 130), (0, 1, 5))):
        storage, head_dim = STORAGES[i % 3], (16, 64, 80)[(i // 3) % 3]
        options = [
            (variant, Q)
            for variant in PLANS
            for Q in (0, 1, 10)
            if _valid(rule, L - Q, Q, P) and (variant != "short" or plans.short_eligible(L, head_dim))
        ]
        if not options:
            continue
        scores = [sum(seen[f] for f in _features(v, rule, L, q, P, storage)) for v, q in options]
        variant, Q = options[scores.index(min(scores))]
        seen.update(_features(variant, rule, L, Q, P, storage))
        R = L - Q
        cases.append(pytest.param(variant, rule, R, Q, P, head_dim, storage, id=f"{variant}-{rule}-R{R}-Q{Q}-P{P}"))
    return cases


def test_spec_cases_cover_every_variant_with_every_rule_storage_prefix_and_query_count():
    cases = [c.values for c in spec_cases()]
    seen = {(v, x) for v, rule, R, Q, P, _, storage in cases for x in (rule, storage, f"P{P}", f"Q{Q}")}
    assert set(itertools.product(PLANS, [*RULES, *STORAGES, "P0", "P1", "P5", "Q0", "Q1", "Q10"])) <= seen
    # The multi-block lengths with query rows: each backward variant that can run them does.
    multi_block = {(v, R + Q) for v, _, R, Q, *_ in cases if Q > 0 and R + Q >= 47}
    assert {(v, L) for v in PLANS for L in (47, 64, 130) if v != "short" or L <= 64} <= multi_block


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant, rule, R, Q, P, head_dim, storage", spec_cases())
def test_kernel_matches_float64_reference(variant, rule, R, Q, P, head_dim, storage, dtype):
    layout = layout_for(rule, R, Q, P)
    q, k, v = inputs(2, 2, layout, head_dim, dtype, storage)
    with plans.forced_plan(plan(variant, layout.length, head_dim, dtype)):
        check_against_reference(q, k, v, layout, head_dim**-0.5, storage, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("variant", [v for v in PLANS if PLANS[v].bwd != "short"])  # one tile: no blocks; L > 64
@pytest.mark.parametrize("rule", ["raw", "raw+self", "prefix+raw"])
def test_hidden_prefix_spanning_whole_blocks(variant, rule, dtype):
    """P = 40 is longer than the 16- and 32-key blocks: for ``raw`` and ``raw+self`` query rows start
    past whole key blocks (a row block of query rows only, [64, 96) as R = 64 is a block boundary,
    begins its key loop past 0) and key blocks inside the prefix are seen by raw rows only. The spec
    cases have P <= 5, below every block. ``prefix+raw`` hides nothing: the contrast."""
    layout = layout_for(rule, 64, 10, 40)
    q, k, v = inputs(1, 2, layout, 16, dtype, "strided")
    with plans.forced_plan(plan(variant, layout.length, 16, dtype)):
        check_against_reference(q, k, v, layout, 16**-0.5, "strided", dtype)


@pytest.mark.parametrize(
    "head_dim, rule, variant",
    [
        (d, rule, variant)
        for (d, rule), variant in zip(
            itertools.product([16, 32, 48, 80, 96, 128], ["prefix+raw", "raw+self"]), itertools.cycle(PLANS)
        )
    ],
)
def test_head_dims(head_dim, rule, variant):
    layout = layout_for(rule, 37, 10, 1)
    q, k, v = inputs(1, 2, layout, head_dim, torch.float16, "strided")
    with plans.forced_plan(plan(variant, layout.length, head_dim, torch.float16)):
        check_against_reference(q, k, v, layout, 0.7 / math.sqrt(head_dim), "strided", torch.float16)


def visible_keys(rule: str, R: int, Q: int, P: int) -> torch.Tensor:
    """``[L, L]``, True where row i sees key j: the table of ``docs/token-layout.md`` written out row by row
    (independent of ``AttentionLayout.dense_mask``)."""
    L = R + Q
    seen = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        if rule == "bidirectional":
            seen[i, :] = True
        elif i < R:
            seen[i, :R] = True
        else:
            seen[i, (0 if rule.startswith("prefix") else P) : R] = True
            seen[i, i] = rule.endswith("+self")
    return seen


def padded(t: torch.Tensor, extra_rows: int, head_dim_padded: int, poison: float) -> torch.Tensor:
    """``t`` ``[B, H, L, D]`` copied into a poison-filled ``[B, H, L + extra_rows, D_padded]`` buffer and
    returned as the ``[B, H, L, D]`` view: every element past L or past D holds ``poison``."""
    B, H, L, D = t.shape
    buffer = torch.full((B, H, L + extra_rows, head_dim_padded), poison, dtype=t.dtype, device=t.device)
    buffer[:, :, :L, :D] = t
    return buffer[:, :, :L, :D]


# Poison pairs (K, V) for the hidden key positions; None leaves K as it is (V alone non-finite).
POISONS = {"kinf-vnan": (math.inf, math.nan), "knan-vinf": (math.nan, -math.inf), "vnan": (None, math.nan)}
POISON_RULES = ["prefix+raw", "raw", "prefix+raw+self", "raw+self", "bidirectional"]


def poisoned_case(rule: str, poison: str):
    """Inputs with every hidden key position poisoned: the prefix keys under the ``raw`` rules (hidden
    from query rows), query tokens' keys (under ``+self`` every other one, each seen by its own row
    only), and the memory past L and past D of q, k, v and dO. R = 20, Q = 20, P = 3, D = 24 (padded
    to 32): row blocks that mix raw and query rows (20 | 12 in the 32-row tiles), query-only row
    blocks, a prefix inside one key block, and the short backward's single tile holding all three.
    Returns the layout, the clean (q, k, v, dO), the poisoned views and the visibility table."""
    R, Q, P, D = 20, 20, 3, 24
    layout = layout_for(rule, R, Q, P)
    L = layout.length
    seen = visible_keys(rule, R, Q, P)
    poisoned = torch.zeros(L, dtype=torch.bool)
    if rule in ("raw", "raw+self"):
        poisoned[:P] = True
    if rule in ("prefix+raw", "raw"):
        poisoned[R:] = True
    elif rule.endswith("+self"):
        poisoned[R + 1 :: 2] = True
    poison_k, poison_v = POISONS[poison]
    clean = [torch.randn(2, 2, L, D, device=KERNEL_DEVICE) for _ in range(4)]
    q, k, v, do = (padded(t, 3, 32, math.nan) for t in clean)
    if poison_k is not None:
        k[:, :, poisoned] = poison_k
    v[:, :, poisoned] = poison_v
    return layout, clean, (q, k, v, do), seen, seen[:, poisoned].any(1)


def check_hidden_keys(layout, clean, seen, rows_hit, out, grads):
    """Rows that see no poisoned key get the float64 reference's output and dQ of the clean inputs;
    keys seen by none of the rows that do get its dK and dV; keys no row sees get exactly zero; and
    every row that sees a poisoned V is non-finite (the kernel may not hide it)."""
    q, k, v, do = clean
    truth, truth_grads = reference_with_grads(q, k, v, do, layout, q.shape[-1] ** -0.5)
    clean_rows = ~rows_hit
    clean_keys = ~seen[rows_hit].any(0)
    unseen = ~seen.any(0)
    for name, got, want, where in zip(
        ("out", "dq", "dk", "dv"),
        (out, *grads),
        (truth, *truth_grads),
        (clean_rows, clean_rows, clean_keys, clean_keys),
    ):
        assert max_error(got[:, :, where], want[:, :, where]) < 1e-5, f"{name}: a hidden key leaked"
    assert torch.count_nonzero(grads[1][:, :, unseen]) == 0 and torch.count_nonzero(grads[2][:, :, unseen]) == 0
    assert not torch.isfinite(out[:, :, rows_hit]).all(-1).any(), "a row that sees inf/NaN came out finite"


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("variant", list(PLANS))
@pytest.mark.parametrize("rule", POISON_RULES)
def test_hidden_keys_never_contribute(rule, variant, poison):
    """docs/token-layout.md: a key a row may not see has no effect on it, "even inf or NaN", forward and
    backward, in every kernel variant (``poisoned_case``, ``check_hidden_keys``)."""
    layout, clean, (q, k, v, do), seen, rows_hit = poisoned_case(rule, poison)
    with plans.forced_plan(plan(variant, layout.length, q.shape[-1], torch.float32)):
        out, _, grads = run_poisoned(q, k, v, do, layout, q.shape[-1] ** -0.5, "contiguous")
    check_hidden_keys(layout, clean, seen, rows_hit, out, grads)


@pytest.mark.parametrize("backend", ["triton", "sdpa", "reference"])
@pytest.mark.parametrize("rule", POISON_RULES)
def test_hidden_keys_never_contribute_in_any_backend(rule, backend):
    """The same promise through the public API and autograd, for every backend."""
    layout, clean, (q, k, v, do), seen, rows_hit = poisoned_case(rule, "kinf-vnan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = adclr_attention(q, k, v, layout, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), do)
    check_hidden_keys(layout, clean, seen, rows_hit, out.detach(), grads)


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


def test_eager_calls_skip_the_custom_op_dispatch(monkeypatch):
    """Eager calls run the custom ops' bodies directly (their dispatch was about half of a call's
    Python cost), and a call without a gradient to track skips the autograd function too; results
    as the float64 reference. Compiled calls keep the ops (``test_compiles_without_graph_break``)."""

    def refuse(*args):
        raise AssertionError("dispatched in eager mode")

    monkeypatch.setattr(triton_attention, "_attention_fwd_op", refuse)
    monkeypatch.setattr(triton_attention, "_attention_bwd_op", refuse)
    layout = AttentionLayout(13, 3, 1, "raw+self")
    qkv = torch.randn(1, layout.length, 3, 2, 16, device=KERNEL_DEVICE)
    qkv64 = qkv.double().requires_grad_()
    expected = adclr_attention_packed(qkv64, layout, backend="reference")
    with torch.no_grad(), monkeypatch.context() as no_autograd:
        no_autograd.setattr(triton_attention.TritonADCLRAttentionPacked, "apply", refuse)
        assert max_error(adclr_attention_packed(qkv, layout, backend="triton"), expected) < 1e-5
    out = adclr_attention_packed(qkv.requires_grad_(), layout, backend="triton")
    do = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, do)
    (grad_ref,) = torch.autograd.grad(expected, qkv64, do.double())
    assert max_error(out, expected) < 1e-5 and max_error(grad, grad_ref) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "sdpa", "reference", "auto"])
def test_the_model_path_computes_what_the_public_api_does(backend):
    """``model_attention[_packed]`` (what ``adclr.model`` calls, without the public checks) against
    the float64 reference, forward and gradient, both forms; a layout of another length is refused
    (the kernels would read past the tensors). Catches a fast path that splits qkv or orders its
    strides wrongly, or that skips the one check that guards memory."""
    layout = AttentionLayout(13, 3, 1, "raw+self")
    scale = 16**-0.5
    qkv = torch.randn(2, layout.length, 3, 2, 16, device=KERNEL_DEVICE if backend == "triton" else "cpu")
    qkv64 = qkv.double().requires_grad_()
    expected = adclr_attention_packed(qkv64, layout, backend="reference")
    do = torch.randn_like(expected)
    (grad_ref,) = torch.autograd.grad(expected, qkv64, do)

    out = model_attention_packed(qkv.requires_grad_(), layout, scale, 0.0, backend)
    (grad,) = torch.autograd.grad(out, qkv, do.to(qkv.dtype))
    assert max_error(out, expected) < 1e-5 and max_error(grad, grad_ref) < 1e-5
    q, k, v = (t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4))
    out4 = model_attention(q, k, v, layout, scale, 0.0, backend)
    grads = torch.autograd.grad(out4, (q, k, v), do.to(qkv.dtype).transpose(1, 2))
    assert max_error(out4.transpose(1, 2), expected) < 1e-5
    assert max_error(torch.stack(grads, 2).permute(0, 3, 2, 1, 4), grad_ref) < 1e-5
    with pytest.raises(ValueError, match="sequence length"):
        model_attention_packed(qkv, AttentionLayout(14, 3), scale, 0.0, backend)
    with pytest.raises(ValueError, match="sequence length"):
        model_attention(q, k, v, AttentionLayout(12, 3), scale, 0.0, backend)


def test_the_model_path_refuses_a_backend_name_it_does_not_know():
    """A name set on a layer past ``set_attn_backend``'s check is refused by name, not run as the reference."""
    layout = AttentionLayout(5, 2)
    qkv = torch.randn(1, layout.length, 3, 1, 8)
    with pytest.raises(ValueError, match="backend must be one of .*got 'flash'"):
        model_attention_packed(qkv, layout, 8**-0.5, 0.0, "flash")
    with pytest.raises(ValueError, match="backend must be one of .*got 'flash'"):
        model_attention(*qkv.permute(2, 0, 3, 1, 4), layout, 8**-0.5, 0.0, "flash")


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_the_model_path_refuses_mixed_dtypes(backend):
    """q and k through fp32 norms under autocast beside a half-precision v: refused by name, as the
    public API refuses it, never launched with mixed pointers."""
    layout = AttentionLayout(5, 2)
    q, k = (torch.randn(1, 1, layout.length, 8, device=KERNEL_DEVICE) for _ in range(2))
    v = torch.randn(1, 1, layout.length, 8, device=KERNEL_DEVICE, dtype=torch.float16)
    with pytest.raises(TypeError, match="q, k and v must share one dtype"):
        model_attention(q, k, v, layout, 8**-0.5, 0.0, backend)


def test_the_backward_runs_the_plan_its_forward_resolved(monkeypatch):
    """The forward's plan travels to its backward (``CallContext``): a backward run after the forced
    plan was left still runs that plan's variant, not a fresh resolution's. Catches a backward that
    resolves its plan again (a second lookup per call, and a mismatch with the forward's
    log-sum-exp layout if the state changed in between)."""
    ran = []
    real = triton_attention.run_launches
    monkeypatch.setattr(
        triton_attention,
        "run_launches",
        lambda launches, target: ran.extend(x.name for x in launches) or real(launches, target),
    )
    layout = AttentionLayout(13, 3, 1, "prefix+raw")
    assert plans.default_plan(layout.length, 16, torch.float32, interpreting=KERNEL_DEVICE != "cuda").bwd == "fused"
    forced = plan("short", layout.length, 16, torch.float32)
    qkv = torch.randn(1, layout.length, 3, 2, 16, device=KERNEL_DEVICE)
    qkv64 = qkv.double().requires_grad_()
    expected = adclr_attention_packed(qkv64, layout, backend="reference")
    with plans.forced_plan(forced):
        out = adclr_attention_packed(qkv.requires_grad_(), layout, backend="triton")
    do = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, qkv, do)
    (grad_ref,) = torch.autograd.grad(expected, qkv64, do.double())
    assert ran == ["v2_fwd", "short"]
    assert max_error(grad, grad_ref) < 1e-5


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


@pytest.mark.parametrize("length", [47, 70])  # the short and the fused backward by default
def test_fp32_attention_is_not_tf32_rounded(length):
    """fp32 inputs keep fp32 accuracy (no TF32 in the products): error far below TF32's ~1e-3."""
    layout = AttentionLayout(length - 10, 10)
    q, k, v = (3 * t.requires_grad_() for t in inputs(1, 2, layout, 64, torch.float32, "contiguous"))
    out = adclr_attention(q, k, v, layout, backend="triton")
    ref = adclr_attention(q.double(), k.double(), v.double(), layout, backend="reference")
    assert max_error(out, ref) < 5e-5
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.double())
    assert max(max_error(g, r) for g, r in zip(grads, ref_grads)) < 2e-4


def test_forced_short_backward_refuses_a_sequence_it_cannot_hold():
    layout = AttentionLayout(120, 10)
    q, k, v = inputs(1, 1, layout, 16, torch.float32, "contiguous")
    with plans.forced_plan(PLANS["short"]), pytest.raises(ValueError, match="short backward"):
        run_poisoned(q, k, v, torch.randn_like(q), layout, 0.25, "contiguous")


# -------------------------------------------------------------------------------------------------
# GPU only
# -------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shape", list(VIT_SHAPES), ids=list(VIT_SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_real_shapes(shape, rule, dtype):
    """What a model gets (the tuned table's plan if this GPU has one, else the defaults)."""
    B, H, R, Q, D = VIT_SHAPES[shape]
    layout = layout_for(rule, R, Q, 1)
    q, k, v = inputs(B, H, layout, D, dtype, "packed", device="cuda")
    check_against_reference(q, k, v, layout, D**-0.5, "packed", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["short", "fused"])
def test_gpu_call_replays_from_a_cuda_graph(variant):
    """The benchmarks time our call as replays of a CUDA graph (``bench.common.capture_graph``): the
    whole packed call, forward and backward, must capture, and a replay on new inputs copied into
    the captured ones must give what an eager call gives on them (the same kernels: bit for bit)."""
    from bench.common import capture_graph

    layout = AttentionLayout(37, 10, 1, "prefix+raw")
    forced = plan(variant, layout.length, 64, torch.bfloat16)
    qkv = torch.randn(8, layout.length, 3, 6, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    do = torch.randn(8, layout.length, 6, 64, dtype=torch.bfloat16, device="cuda")
    captured = {}

    def call():
        with plans.forced_plan(forced):
            captured["out"] = adclr_attention_packed(qkv, layout, backend="triton")
            captured["out"].backward(do)

    graph = capture_graph(call, "cuda", grad_to_none=[qkv])
    fresh, fresh_do = torch.randn_like(qkv), torch.randn_like(do)
    with torch.no_grad():
        qkv.copy_(fresh)
        do.copy_(fresh_do)
    graph.replay()
    torch.cuda.synchronize()
    replayed_out, replayed_grad = captured["out"].detach().clone(), qkv.grad.clone()
    x = fresh.clone().requires_grad_()
    with plans.forced_plan(forced):
        out = adclr_attention_packed(x, layout, backend="triton")
    (grad,) = torch.autograd.grad(out, x, fresh_do)
    assert torch.equal(replayed_out, out) and torch.equal(replayed_grad, grad)


GPU_VARIANT_SHAPES = [("short", "vit_s16_local96"), ("fused", "vit_s16_local96"), ("fused", "vit_s16_global")]
GPU_VARIANT_SHAPES += [("fused", "vit_s8_global")]


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["prefix+raw", "raw+self"])
@pytest.mark.parametrize("variant, shape", GPU_VARIANT_SHAPES)
def test_gpu_each_backward_variant_at_real_shapes(variant, shape, rule):
    B, H, R, Q, D = VIT_SHAPES[shape]
    layout = layout_for(rule, R, Q, 1)
    q, k, v = inputs(B, H, layout, D, torch.bfloat16, "packed", device="cuda")
    with plans.forced_plan(plan(variant, layout.length, D, torch.bfloat16)):
        check_against_reference(q, k, v, layout, D**-0.5, "packed", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("L", [1, 197, 795, 4096])
def test_gpu_long_and_short_sequences(L):
    layout = AttentionLayout(max(L - 10, 1), min(10, L - 1), 1, "raw+self" if L > 1 else "prefix+raw")
    q, k, v = inputs(2, 3, layout, 64, torch.bfloat16, "contiguous", device="cuda")
    check_against_reference(q, k, v, layout, 0.125, "contiguous", torch.bfloat16)


@pytest.mark.gpu
def test_gpu_offsets_past_2_31_elements():
    """A packed qkv of more than 2**31 elements (4.3 GB in bf16; about 12 GB with o, dO and the
    gradient): the last batch entries start past element 2**31, so a batch or head offset computed in
    int32 would wrap. One forward and one backward of the whole batch into poisoned buffers; the last
    two entries are checked against the reference on qkv[-2:]."""
    layout = AttentionLayout(197, 10, 1, "raw+self")
    batch, heads, head_dim = 9100, 6, 64
    qkv = torch.randn(batch, layout.length, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    assert (batch - 2) * qkv.stride(0) >= 2**31  # both checked entries lie past int32's reach
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    do = torch.randn(batch, layout.length, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    out, lse, grads = run_poisoned(q, k, v, do, layout, head_dim**-0.5, "packed")
    tail = slice(batch - 2, batch)
    lse_tail = lse.view(batch, heads, layout.length)[tail]
    check_results(
        q[tail], k[tail], v[tail], do[tail], out[tail], lse_tail, [g[tail] for g in grads], layout,
        head_dim**-0.5, torch.bfloat16,
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("variant, R", [("short", 37), ("fused", 37), ("fused", 197)])
@pytest.mark.parametrize("rule", ["prefix+raw", "raw+self"])
def test_gpu_backward_is_deterministic(variant, R, rule):
    layout = AttentionLayout(R, 10, query_keys=rule)
    qkv = torch.randn(32, layout.length, 3, 6, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(32, layout.length, 6, 64, device="cuda", dtype=torch.bfloat16)
    first = None
    with plans.forced_plan(plan(variant, layout.length, 64, torch.bfloat16)):
        for _ in range(20):
            (grad,) = torch.autograd.grad(adclr_attention_packed(qkv, layout, backend="triton"), qkv, do)
            if first is None:
                first = grad
            assert torch.equal(grad, first), "dq/dk/dv changed between identical runs"


@pytest.mark.gpu
@pytest.mark.parametrize("R", [37, 197])
def test_gpu_autotuned_tiles_are_correct(R, monkeypatch):
    """ADCLR_AUTOTUNE=1 swaps the tile tables for a few autotuned candidates: each must be exact too."""
    monkeypatch.setenv("ADCLR_AUTOTUNE", "1")
    layout = AttentionLayout(R, 10, 1, "raw+self")
    q, k, v = inputs(16, 6, layout, 64, torch.bfloat16, "packed", device="cuda")
    check_against_reference(q, k, v, layout, 64**-0.5, "packed", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("variant, rule, R, Q, P, head_dim, storage", spec_cases())
def test_gpu_spec_cases_bf16(variant, rule, R, Q, P, head_dim, storage):
    """The interpreter's cases again in bf16, which the interpreter cannot run (fp32/fp16 run above)."""
    layout = layout_for(rule, R, Q, P)
    q, k, v = inputs(3, 5, layout, head_dim, torch.bfloat16, storage, device="cuda")
    with plans.forced_plan(plan(variant, layout.length, head_dim, torch.bfloat16)):
        check_against_reference(q, k, v, layout, head_dim**-0.5, storage, torch.bfloat16)
