"""The ADCLR ViT against timm, the query-token invariants, heads and the multi-crop wrapper."""

import pytest
import timm
import torch
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


def test_sdpa_and_reference_backends_agree_with_grads():
    model = tiny_vit(query_keys="raw+self")
    views, crops = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 3, 8, 8)
    results = []
    for backend in ("sdpa", "reference"):
        model.set_attn_backend(backend)
        model.zero_grad()
        out = model(views, crops)
        (out.cls.sum() + out.queries.pow(2).sum()).backward()
        results.append((out.queries.detach(), model.blocks[0].attn.qkv.weight.grad.clone()))
    assert max_error(results[0][0], results[1][0]) <= 1e-5
    assert max_error(results[0][1], results[1][1]) <= 1e-4


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
def test_multicrop_wrapper_groups_resolutions(separate_query_head):
    backbone = tiny_vit()
    head = DINOHead(32, 50, 64, 16)
    wrapper = MultiCropWrapper(backbone, head, DINOHead(32, 50, 64, 16) if separate_query_head else None)
    crops = [torch.randn(3, 3, 32, 32)] * 2 + [torch.randn(3, 3, 16, 16)] * 4
    query_crops = torch.randn(3, 5, 3, 8, 8)
    cls, queries = wrapper(crops, query_crops)
    assert cls.shape == (18, 50) and queries.shape == (2, 3, 5, 50)
    with torch.no_grad():
        direct = backbone(crops[1], query_crops)
    expected_head = wrapper.query_head or head
    assert max_error(queries[1], expected_head(direct.queries)) <= 1e-5
    assert max_error(cls[3:6], head(direct.cls)) <= 1e-5


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
