"""The ADCLR ViT against timm, the query-token invariants, heads and the multi-crop wrapper."""

import pytest
import timm
import torch
import torch.nn.functional as F
from attention_utils import max_error

from adclr.heads import DINOHead
from adclr.kernels import AttentionLayout
from adclr.model import MultiCropWrapper, build_vit, timm_create_kwargs

TINY = dict(embed_dim=32, depth=2, num_heads=2)


def tiny_vit(**kwargs):
    from adclr.model import ADCLRVisionTransformer

    return ADCLRVisionTransformer(patch_size=8, img_size=32, **TINY, **kwargs).eval()


@pytest.mark.parametrize("arch, patch", [("vit_tiny", 16), ("vit_small", 16), ("vit_tiny", 8)])
def test_matches_timm_without_query_crops_and_loads_strictly(arch, patch):
    model = build_vit(arch, patch, img_size=64, attn_backend="sdpa").eval()
    reference = timm.create_model(**timm_create_kwargs(arch, patch, 64)).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    views = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model(views)
        theirs = reference.forward_features(views)
    assert max_error(ours.cls, theirs[:, 0]) <= 1e-5
    assert max_error(ours.patches, theirs[:, 1:]) <= 1e-5
    assert ours.queries is None


def test_dynamic_image_size_shares_weights():
    model = tiny_vit()
    assert model(torch.randn(1, 3, 32, 32)).patches.shape == (1, 16, 32)
    assert model(torch.randn(1, 3, 16, 16)).patches.shape == (1, 4, 32)


@pytest.mark.parametrize("rule", ["prefix+raw", "raw", "prefix+raw+self", "raw+self"])
def test_query_crops_never_change_cls_or_patches(rule):
    model = tiny_vit(query_keys=rule, attn_backend="sdpa")
    views, crops = torch.randn(2, 3, 32, 32), torch.randn(2, 5, 3, 8, 8)
    with torch.no_grad():
        plain = model(views)
        with_queries = model(views, crops)
        other_pixels = model(views, torch.randn_like(crops))
    assert with_queries.queries.shape == (2, 5, 32)
    for out in (with_queries, other_pixels):
        assert max_error(out.cls, plain.cls) <= 1e-6 and max_error(out.patches, plain.patches) <= 1e-6
    assert max_error(with_queries.queries, other_pixels.queries) > 1e-3


def test_bidirectional_ablation_lets_queries_change_cls():
    model = tiny_vit(bidirectional=True, attn_backend="sdpa")
    views, crops = torch.randn(2, 3, 32, 32), torch.randn(2, 5, 3, 8, 8)
    with torch.no_grad():
        assert max_error(model(views, crops).cls, model(views, torch.randn_like(crops)).cls) > 1e-4


def test_query_tokens_get_no_position_embedding():
    """A query token's first-block input is the bare patch projection of its crop."""
    model = tiny_vit()
    crops = torch.randn(1, 3, 3, 8, 8)
    tokens, layout = model.tokens_and_layout(torch.randn(1, 3, 32, 32), crops)
    projected = model.patch_embed.proj(crops[0]).flatten(1)
    assert layout == AttentionLayout(17, 3, 1)
    assert max_error(tokens[0, 17:], projected) <= 1e-6


def allowed_keys(R: int, Q: int, rule: str) -> torch.Tensor:
    """``[L, L]`` True where row i may attend to key j, written from docs/token-layout.md's table (one CLS token)."""
    L = R + Q
    if rule == "bidirectional":
        return torch.ones(L, L, dtype=torch.bool)
    allowed = torch.zeros(L, L, dtype=torch.bool)
    allowed[:R, :R] = True  # CLS and raw patches see CLS and raw patches
    allowed[R:, (0 if rule.startswith("prefix") else 1) : R] = True
    if rule.endswith("+self"):
        allowed[R:, R:] = torch.eye(Q, dtype=torch.bool)
    return allowed


def manual_vit(model, views, query_crops, rule):
    """The ViT of paper Eqs. 3-5 written out from ``model``'s weights: ``(cls, patches, queries)``.

    Raw tokens get CLS and position embeddings; query crops get only the patch projection; every block is
    pre-norm attention (restricted to ``allowed_keys``) then MLP, each with a residual; a final LayerNorm.
    """
    assert isinstance(model.patch_embed.norm, torch.nn.Identity) and isinstance(model.norm_pre, torch.nn.Identity)
    proj = model.patch_embed.proj
    patches = F.conv2d(views, proj.weight, proj.bias, stride=proj.stride).flatten(2).transpose(1, 2)
    B, N, C = patches.shape
    raw = torch.cat([model.cls_token.expand(B, -1, -1), patches], dim=1) + model.pos_embed
    queries = F.conv2d(query_crops.flatten(0, 1), proj.weight, proj.bias, stride=proj.stride).view(B, -1, C)
    x = torch.cat([raw, queries], dim=1)
    R, L = N + 1, x.shape[1]
    allowed = allowed_keys(R, L - R, rule)
    for block in model.blocks:
        attn, heads = block.attn, block.attn.num_heads
        h = F.layer_norm(x, (C,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
        q, k, v = F.linear(h, attn.qkv.weight, attn.qkv.bias).view(B, L, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (C // heads) ** -0.5
        mixed = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(B, L, C)
        x = x + F.linear(mixed, attn.proj.weight, attn.proj.bias)
        h = F.layer_norm(x, (C,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
        x = x + F.linear(
            F.gelu(F.linear(h, block.mlp.fc1.weight, block.mlp.fc1.bias)), block.mlp.fc2.weight, block.mlp.fc2.bias
        )
    x = F.layer_norm(x, (C,), model.norm.weight, model.norm.bias, model.norm.eps)
    return x[:, 0], x[:, 1:R], x[:, R:]


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("rule", ["prefix+raw", "raw", "prefix+raw+self", "raw+self", "bidirectional"])
def test_forward_and_every_gradient_match_a_manual_vit(rule, backend):
    """Outputs and every parameter gradient (of a randomly weighted sum of CLS, patch and query outputs)
    against ``manual_vit`` in float64: catches position embeddings on queries, queries seeing each other,
    raw tokens seeing queries, a wrong query-key rule, and a backward that differs from the forward."""
    options = dict(bidirectional=True) if rule == "bidirectional" else dict(query_keys=rule)
    model = tiny_vit(attn_backend=backend, **options).double()
    with torch.no_grad():  # timm starts the CLS token and position embedding near zero: make them matter
        model.cls_token.normal_()
        model.pos_embed.normal_()
    views, crops = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.randn(3, 4, 3, 8, 8, dtype=torch.float64)
    out = model(views, crops)
    expected = manual_vit(model, views, crops, rule)
    weights = [torch.randn_like(t) for t in expected]
    results = []
    for outputs in ((out.cls, out.patches, out.queries), expected):
        model.zero_grad(set_to_none=True)
        sum((o * w).sum() for o, w in zip(outputs, weights)).backward(retain_graph=True)
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, actual, truth in zip(("cls", "patches", "queries"), (out.cls, out.patches, out.queries), expected):
        assert max_error(actual, truth) <= 1e-10, name
    for name, truth in results[1].items():
        assert max_error(results[0][name], truth) <= 1e-10 * (1 + truth.abs().max().item()), name


def test_last_attention_maps_respect_the_layout():
    model = tiny_vit()
    probs, layout = model.last_attention(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 3, 8, 8))
    assert probs.shape == (2, 2, 20, 20)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 20))
    assert (probs[..., ~layout.dense_mask()] == 0).all()


def test_bad_options_raise():
    with pytest.raises(ValueError, match="query_keys"):
        tiny_vit(query_keys="everything")
    with pytest.raises(ValueError, match="attn_backend"):
        tiny_vit(attn_backend="cuda")
    with pytest.raises(ValueError, match="arch"):
        build_vit("vit_huge")
    with pytest.raises(ValueError, match="one patch"):
        tiny_vit()(torch.randn(1, 3, 32, 32), torch.randn(1, 2, 3, 16, 16))


def test_dino_head_shapes_and_frozen_magnitude():
    head = DINOHead(32, out_dim=100, hidden_dim=64, bottleneck_dim=16)
    assert head(torch.randn(5, 32)).shape == (5, 100)
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad and torch.all(magnitude == 1)
    assert DINOHead(32, 10, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


@pytest.mark.parametrize("separate_query_head", [False, True])
@pytest.mark.parametrize("local_size", [16, 32], ids=["small_local_crops", "local_crops_of_global_size"])
def test_multicrop_wrapper_matches_each_crop_on_its_own(separate_query_head, local_size):
    """Every crop distinct: each crop's CLS logits and each global view's query logits are those of that
    crop alone through the backbone and the right head (a swap, a view/batch mix-up or query crops sent
    to a local crop would show)."""
    backbone = tiny_vit()
    head = DINOHead(32, 50, 64, 16)
    query_head = DINOHead(32, 50, 64, 16) if separate_query_head else None
    wrapper = MultiCropWrapper(backbone, head, query_head)
    B, Q = 3, 5
    crops = [torch.randn(B, 3, 32, 32) for _ in range(2)]
    crops += [torch.randn(B, 3, local_size, local_size) for _ in range(4)]
    query_crops = torch.randn(B, Q, 3, 8, 8)
    with torch.no_grad():
        cls, queries = wrapper(crops, query_crops)
        assert cls.shape == (6 * B, 50) and queries.shape == (2, B, Q, 50)
        for view, crop in enumerate(crops):
            alone = backbone(crop, query_crops if view < 2 else None)
            assert max_error(cls[view * B : (view + 1) * B], head(alone.cls)) <= 1e-5, f"CLS of crop {view}"
            if view < 2:
                expected = (query_head or head)(alone.queries)
                assert max_error(queries[view], expected) <= 1e-5, f"queries of view {view}"
        assert max_error(queries[0], queries[1]) > 1e-3  # the two views' query outputs really differ


def _all_grads(model, backend, views, crops, weights, dtype):
    model.set_attn_backend(backend)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = model(views, crops)
        loss = (out.cls.float() * weights[0]).sum() + (out.queries.float() * weights[1]).sum()
    loss.backward()
    return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["prefix+raw", "raw+self"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_vit_gradients_triton_match_reference_backend(rule, dtype):
    """Every parameter gradient of a 2-block ViT-S with the fused kernel vs the explicit reference.

    fp32: the two backends agree to float32 rounding. bf16: the fused kernel's error against the
    fp32 reference is at most 2x that of the reference backend run in bf16 (flash-attention's rule).
    """
    from adclr.model import ADCLRVisionTransformer

    model = ADCLRVisionTransformer(
        patch_size=16, img_size=96, embed_dim=384, depth=2, num_heads=6, query_keys=rule
    ).cuda()
    views, crops = torch.randn(4, 3, 96, 96, device="cuda"), torch.randn(4, 10, 3, 16, 16, device="cuda")
    weights = (torch.randn(4, 384, device="cuda"), torch.randn(4, 10, 384, device="cuda"))
    truth = _all_grads(model, "reference", views, crops, weights, torch.float32)
    fused = _all_grads(model, "triton", views, crops, weights, dtype)
    if dtype == torch.float32:
        assert max_error(fused, truth) <= 1e-4 * truth.abs().max().item()
    else:
        low_precision_reference = _all_grads(model, "reference", views, crops, weights, dtype)
        assert (
            max_error(fused, truth) <= 2 * max_error(low_precision_reference, truth) + 1e-3 * truth.abs().max().item()
        )
