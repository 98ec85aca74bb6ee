"""The float64 reference against a hand-written row loop, and the SDPA fallback against the reference."""

import random

import pytest
import torch
from attention_utils import KERNEL_DEVICE, RULES, layout_for, make_qkv, max_error, reference_with_grads

from adclr.kernels import AttentionLayout, adclr_attention, adclr_attention_packed


def row_loop_attention(q, k, v, layout, scale):
    """One row at a time over its allowed keys, from the layout table in docs/token-layout.md (no mask tensor)."""
    out = torch.empty_like(q)
    for i in range(layout.length):
        start, end, has_self = layout.row_keys(i)
        keys = list(range(start, end)) + ([i] if has_self else [])
        scores = (q[..., i : i + 1, :] @ k[..., keys, :].transpose(-2, -1)) * scale
        out[..., i : i + 1, :] = scores.softmax(-1) @ v[..., keys, :]
    return out


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("R, Q, P", [(1, 0, 1), (1, 4, 1), (6, 0, 0), (6, 5, 0), (13, 7, 1), (5, 3, 2)])
def test_reference_matches_row_loop(rule, R, Q, P):
    if rule == "raw" and P == R and Q > 0:
        with pytest.raises(ValueError, match="no key"):
            layout_for(rule, R, Q, P)
        return
    layout = layout_for(rule, R, Q, P)
    q, k, v = make_qkv(2, 3, layout.length, 8, torch.float64, "cpu")
    expected = row_loop_attention(q, k, v, layout, 0.3)
    actual = adclr_attention(q, k, v, layout, scale=0.3, backend="reference")
    assert max_error(actual, expected) < 1e-12


def random_case(rng: random.Random, rule: str):
    P = rng.choice([0, 1, 2])
    R = rng.randint(max(P, 1), 200)
    Q = rng.choice([0, 1, rng.randint(2, 211 - R)]) if R < 211 else 0
    if rule == "raw" and P == R:
        R += 1
    return layout_for(rule, R, Q, P), rng.choice([16, 24, 64, 80, 128])


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", range(3))
def test_sdpa_matches_reference_forward_and_grads(rule, case, dtype, tol):
    layout, head_dim = random_case(random.Random(f"{rule}-{case}"), rule)
    q, k, v = make_qkv(2, 2, layout.length, head_dim, dtype, "cpu", strided=case % 2 == 1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = adclr_attention(q, k, v, layout, backend="sdpa")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref, ref_grads = reference_with_grads(q, k, v, do, layout, head_dim**-0.5)
    assert max_error(out, ref) < tol
    for name, g, r in zip("qkv", grads, ref_grads):
        assert max_error(g, r) < tol * 10, f"d{name}"


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_packed_form_matches_unpacked(backend):
    layout = AttentionLayout(11, 4, query_keys="raw+self")
    qkv = torch.randn(2, layout.length, 3, 3, 16, dtype=torch.float64)
    packed = adclr_attention_packed(qkv, layout, backend=backend)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    assert packed.shape == (2, layout.length, 3, 16)
    assert max_error(packed, adclr_attention(q, k, v, layout, backend="reference").transpose(1, 2)) < 1e-12


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("rule", RULES)
def test_query_tokens_never_change_raw_rows(backend, rule):
    """Raw outputs and raw-token gradients ignore query q/k/v, except in the bidirectional layout."""
    layout = layout_for(rule, 9, 4, 1)
    R = layout.num_raw
    q, k, v = make_qkv(1, 2, layout.length, 16, torch.float64, "cpu")
    do = torch.randn_like(q)

    def raw_part(q, k, v):
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = adclr_attention(q, k, v, layout, backend=backend)
        (out[:, :, :R] * do[:, :, :R]).sum().backward()
        return [out[:, :, :R].detach()] + [t.grad[:, :, :R] for t in (q, k, v)]

    before = raw_part(q, k, v)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, R:] = torch.randn_like(t[:, :, R:])
    after = raw_part(q2, k2, v2)
    changed = [max_error(a, b) > 1e-9 for a, b in zip(before, after)]
    if rule == "bidirectional":
        assert changed[0], "bidirectional raw outputs must depend on the query tokens"
    else:
        assert not any(changed)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_query_token_kv_grads_are_exact_zero_without_self(backend):
    layout = AttentionLayout(9, 4, 1, "raw")
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 2, layout.length, 16, torch.float64, "cpu"))
    adclr_attention(q, k, v, layout, backend=backend).pow(2).sum().backward()
    assert torch.count_nonzero(k.grad[:, :, 9:]) == 0 and torch.count_nonzero(v.grad[:, :, 9:]) == 0


LAYOUT = AttentionLayout(5, 2)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda q: adclr_attention(q, q, q, LAYOUT, backend="cuda"), ValueError, "backend"),
        (lambda q: adclr_attention(q[0], q[0], q[0], LAYOUT), ValueError, "4-D"),
        (lambda q: adclr_attention(q, q[:, :1], q, LAYOUT), ValueError, "same shape"),
        (lambda q: adclr_attention(q, q.half(), q, LAYOUT), TypeError, "same dtype"),
        (lambda q: adclr_attention(q.int(), q.int(), q.int(), LAYOUT), TypeError, "dtype"),
        (lambda q: adclr_attention(q, q, q, AttentionLayout(6, 2)), ValueError, "sequence length 7"),
        (lambda q: adclr_attention(q, q, q, "layout"), TypeError, "AttentionLayout"),
        (lambda q: adclr_attention(q, q, q, LAYOUT, scale=-1.0), ValueError, "scale"),
        (lambda q: adclr_attention(q, q, q, LAYOUT, scale=float("nan")), ValueError, "scale"),
        (lambda q: adclr_attention(q.tolist(), q, q, LAYOUT), TypeError, "q must be a torch.Tensor"),
        (lambda q: adclr_attention(q, q, q, LAYOUT, dropout_p=1.5), ValueError, "dropout_p"),
        (lambda q: adclr_attention_packed(q, LAYOUT), ValueError, r"\[B, L, 3, H, D\]"),
        (lambda q: adclr_attention_packed(torch.zeros(1, 6, 3, 1, 4), LAYOUT), ValueError, "sequence length 6"),
        (lambda q: adclr_attention(*[torch.zeros(1, 2, 7, 0)] * 3, LAYOUT), ValueError, "q, k, v must have head dim"),
        (
            lambda q: adclr_attention(*[torch.zeros(1, 2, 7, 0)] * 3, LAYOUT, backend="reference"),
            ValueError,
            "head dim D >= 1",
        ),
        (
            lambda q: adclr_attention(*[torch.zeros(1, 2, 7, 0)] * 3, LAYOUT, scale=1.0, backend="sdpa"),
            ValueError,
            "D >= 1",
        ),
        (lambda q: adclr_attention(*[torch.zeros(1, 2, 7, 0)] * 3, LAYOUT, backend="triton"), ValueError, "D >= 1"),
        (lambda q: adclr_attention_packed(torch.zeros(1, 7, 3, 2, 0), LAYOUT), ValueError, "qkv must have head dim"),
        (
            lambda q: adclr_attention(*[torch.zeros(1, 2, 0, 4)] * 3, LAYOUT, backend="sdpa"),
            ValueError,
            "q, k, v must have sequence length L >= 1",
        ),
        (
            lambda q: adclr_attention_packed(torch.zeros(1, 0, 3, 2, 4), LAYOUT, backend="triton"),
            ValueError,
            "qkv must have sequence length L >= 1",
        ),
        (lambda q: adclr_attention(q, q, q, LAYOUT, backend="triton"), ValueError, "CUDA"),
        (lambda q: adclr_attention(q.double(), q.double(), q.double(), LAYOUT, backend="triton"), TypeError, "float64"),
        (lambda q: adclr_attention(q, q, q, LAYOUT, backend="triton", dropout_p=0.1), ValueError, "dropout"),
        (lambda q: adclr_attention(*[torch.zeros(1, 1, 7, 264)] * 3, LAYOUT, backend="triton"), ValueError, "256"),
        (
            lambda q: adclr_attention(*[torch.zeros(1, 1, 7, 160)] * 3, LAYOUT, backend="triton"),
            ValueError,
            "float32 head dims up to 128",
        ),
    ],
)
def test_bad_inputs_raise_before_any_kernel(call, error, words, monkeypatch):
    # The checks read TRITON_INTERPRET at call time; no kernel runs in any of these cases.
    monkeypatch.setenv("TRITON_INTERPRET", "0" if words == "CUDA" else "1")
    q = torch.randn(1, 2, 7, 4)
    with pytest.raises(error, match=words):
        call(q)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
@pytest.mark.parametrize("rule", RULES[:-1])
@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_a_key_a_row_may_not_see_cannot_poison_it(backend, rule, poison):
    """inf/NaN in the k and v of the first query token reach only the rows allowed to see that key."""
    layout = layout_for(rule, 11, 3, 1)
    R = layout.num_raw
    q, k, v = make_qkv(2, 2, layout.length, 16, torch.float32, KERNEL_DEVICE if backend == "triton" else "cpu")
    clean = adclr_attention(q, k, v, layout, backend=backend)
    k, v = k.clone(), v.clone()
    k[:, :, R], v[:, :, R] = poison, poison
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = adclr_attention(q, k, v, layout, backend=backend)
    blind = ~layout.dense_mask()[:, R]  # rows that must not see key R
    assert blind.sum() >= layout.length - 1
    assert max_error(out[:, :, blind], clean[:, :, blind]) < 1e-5
    if not layout.query_self:  # nobody sees key R: every gradient stays finite, and its own k/v get exactly zero
        out.backward(torch.randn_like(out))
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        assert torch.count_nonzero(k.grad[:, :, R]) == 0 and torch.count_nonzero(v.grad[:, :, R]) == 0
