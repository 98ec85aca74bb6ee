"""The ADCLR vision transformer: timm's ``VisionTransformer`` with query tokens and layout-aware attention.

Query crops go through the same patch-embedding projection as the raw patches, get no position
embedding, and are appended after the raw tokens (paper Eq. 3). Each block receives the
``AttentionLayout`` through timm's ``attn_mask`` pass-through, so timm's ``Block`` is used unchanged
and parameter names stay timm's: a trained backbone loads into ``timm.create_model(...)`` strictly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from .choices import ARCHS
from .heads import HeadFeatures
from .kernels import AttentionLayout, reference_probabilities
from .kernels.attention import model_attention, model_attention_packed


class ADCLRAttention(Attention):
    """timm's ``Attention`` whose ``attn_mask`` may be an ``AttentionLayout`` (ADCLR's unidirectional mask).

    With a layout (or no mask) it runs ADCLR attention on ``self.backend`` through the kernels' model
    path (the public API's checks hold by construction here; the backend name was checked when set);
    a tensor mask falls back to SDPA so the module stays a drop-in for timm.
    """

    backend: str = "auto"

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if getattr(self, "gate", None) is not None:
            raise ValueError("ADCLRAttention does not support timm's gated attention")
        B, N, _ = x.shape
        qkv = self._qkv(x)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if isinstance(attn_mask, torch.Tensor) or is_causal:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
            out = out.transpose(1, 2)
        else:
            layout = attn_mask if attn_mask is not None else AttentionLayout(N, 0, 0)
            if isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity):
                out = model_attention_packed(qkv, layout, self.scale, dropout_p, self.backend)
            else:
                q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
                q, k = self.q_norm(q), self.k_norm(k)
                out = model_attention(q, k, v, layout, self.scale, dropout_p, self.backend)
                out = out.transpose(1, 2)
        out = self.norm(out.reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(out))

    def attention_probabilities(self, x: torch.Tensor, layout: AttentionLayout) -> torch.Tensor:
        """The softmax weights ``[B, heads, L, L]`` under ``layout`` (reference path, for pictures)."""
        q, k, _ = self._qkv(x).permute(2, 0, 3, 1, 4).unbind(0)
        return reference_probabilities(self.q_norm(q), self.k_norm(k), layout, self.scale)


@dataclass
class ADCLROutput:
    """Final-norm outputs of one backbone pass."""

    cls: torch.Tensor  # [B, C]
    patches: torch.Tensor  # [B, N, C]
    queries: torch.Tensor | None  # [B, Q, C], None without query crops


class ADCLRVisionTransformer(VisionTransformer):
    """A ViT that also carries query tokens under ADCLR's unidirectional attention.

    Args:
        query_keys: the query-key rule of docs/token-layout.md (default ``"prefix+raw"``, paper Eq. 5).
        bidirectional: every token sees every token (the paper's collapsing ablation).
        attn_backend: ``auto`` / ``triton`` / ``sdpa`` / ``reference`` for every block.
        **vit_kwargs: passed to timm's ``VisionTransformer`` (``dynamic_img_size`` is forced on).
    """

    def __init__(
        self, query_keys: str = "prefix+raw", bidirectional: bool = False, attn_backend: str = "auto", **vit_kwargs
    ):
        vit_kwargs.setdefault("num_classes", 0)
        super().__init__(attn_layer=ADCLRAttention, dynamic_img_size=True, **vit_kwargs)
        AttentionLayout(2, 1, min(self.num_prefix_tokens, 1), query_keys, bidirectional)  # validate options early
        self.query_keys = query_keys
        self.bidirectional = bidirectional
        self.set_attn_backend(attn_backend)

    def set_attn_backend(self, backend: str) -> None:
        """Route every block's attention through ``backend``."""
        from .kernels import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"attn_backend must be one of {BACKENDS}, got {backend!r}")
        for block in self.blocks:
            block.attn.backend = backend

    def embed_queries(self, query_crops: torch.Tensor) -> torch.Tensor:
        """``[B, Q, 3, p, p]`` crops -> ``[B, Q, C]`` tokens: the patch projection, no position embedding."""
        B, Q = query_crops.shape[:2]
        p = self.patch_embed.patch_size
        if tuple(query_crops.shape[-2:]) != tuple(p):
            raise ValueError(
                f"query_crops must be [B, Q, 3, {p[0]}, {p[1]}] (one patch each), got {tuple(query_crops.shape)}"
            )
        tokens = self.patch_embed.proj(query_crops.flatten(0, 1)).reshape(B, Q, -1)
        return self.norm_pre(self.patch_embed.norm(tokens))

    def tokens_and_layout(self, views: torch.Tensor, query_crops: torch.Tensor | None):
        """Input tokens ``[CLS, raw..., queries...]`` and the layout that goes with them."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(views))))
        num_raw, num_query = x.shape[1], 0
        if query_crops is not None:
            if query_crops.shape[0] != views.shape[0]:
                raise ValueError(f"query_crops batch {query_crops.shape[0]} != views batch {views.shape[0]}")
            queries = self.embed_queries(query_crops)
            num_query = queries.shape[1]
            x = torch.cat([x, queries], dim=1)
        layout = AttentionLayout(num_raw, num_query, self.num_prefix_tokens, self.query_keys, self.bidirectional)
        return x, layout

    def forward(self, views: torch.Tensor, query_crops: torch.Tensor | None = None) -> ADCLROutput:
        x, layout = self.tokens_and_layout(views, query_crops)
        for block in self.blocks:
            x = block(x, attn_mask=layout)
        x = self.norm(x)
        R = layout.num_raw
        return ADCLROutput(
            cls=x[:, 0],
            patches=x[:, self.num_prefix_tokens : R],
            queries=x[:, R:] if layout.num_query else None,
        )

    @torch.no_grad()
    def last_attention(
        self, views: torch.Tensor, query_crops: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, AttentionLayout]:
        """The last block's attention weights ``[B, heads, L, L]`` and the layout, for visualisation."""
        x, layout = self.tokens_and_layout(views, query_crops)
        for block in self.blocks[:-1]:
            x = block(x, attn_mask=layout)
        last = self.blocks[-1]
        return last.attn.attention_probabilities(last.norm1(x), layout), layout


def build_vit(arch: str = "vit_small", patch_size: int = 16, img_size: int = 224, **kwargs) -> ADCLRVisionTransformer:
    """An ADCLR ViT-Tiny/Small/Base with timm's defaults for that architecture."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {tuple(ARCHS)}, got {arch!r}")
    return ADCLRVisionTransformer(patch_size=patch_size, img_size=img_size, **ARCHS[arch], **kwargs)


def timm_create_kwargs(arch: str, patch_size: int, img_size: int = 224) -> dict:
    """``timm.create_model`` arguments that build the same architecture (to load an exported backbone)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {tuple(ARCHS)}, got {arch!r}")
    return dict(
        model_name="vit_small_patch16_224",
        patch_size=patch_size,
        img_size=img_size,
        num_classes=0,
        dynamic_img_size=True,
        **ARCHS[arch],
    )


class MultiCropWrapper(nn.Module):
    """DINO's multi-crop wrapper with query crops: one backbone pass per crop resolution.

    Query crops ride along with the first (global) resolution group only; every view of that group
    gets the same query crops. The head maps the CLS outputs of all crops and the query outputs; with
    ``head_features=True`` it stops before its last layer and returns ``HeadFeatures`` for the fused
    loss, which applies the last layer chunk by chunk (``adclr.fused_loss``).
    """

    def __init__(self, backbone: ADCLRVisionTransformer, head: nn.Module, query_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.query_head = query_head

    def forward(self, crops: list[torch.Tensor], query_crops: torch.Tensor | None = None, *, head_features=False):
        """``(cls_logits [n_crops*B, K], query_logits [n_query_views, B, Q, K] or None)``, or ``HeadFeatures``."""
        cls_features, query_features = self._backbone_outputs(crops, query_crops)
        if head_features:
            return self._head_features(cls_features, query_features)
        if query_features is None:
            return self.head(cls_features), None
        if self.query_head is None:  # shared head: one pass over CLS and query features together
            n_cls = cls_features.shape[0]
            logits = self.head(torch.cat([cls_features, query_features.flatten(0, 2)]))
            return logits[:n_cls], logits[n_cls:].view(*query_features.shape[:3], -1)
        return self.head(cls_features), self.query_head(query_features)

    def _backbone_outputs(self, crops, query_crops):
        """Backbone CLS outputs of every crop ``[n_crops*B, C]`` and query outputs ``[views, B, Q, C]``.

        One backbone pass per run of same-size crops; with query crops the two global views are a group
        of their own even when the local crops have their size, since only they carry the queries.
        """
        ends = {i for i in range(1, len(crops)) if crops[i].shape[-1] != crops[i - 1].shape[-1]} | {len(crops)}
        if query_crops is not None:
            ends.add(min(2, len(crops)))
        cls_features, query_features, start = [], None, 0
        for end in sorted(ends):
            group = torch.cat(crops[start:end])
            queries = None
            if start == 0 and query_crops is not None:
                queries = query_crops.repeat(end - start, 1, 1, 1, 1)
            out = self.backbone(group, queries)
            cls_features.append(out.cls)
            if out.queries is not None:
                query_features = out.queries.unflatten(0, (end - start, -1))
            start = end
        return torch.cat(cls_features), query_features

    def _head_features(self, cls_features, query_features) -> HeadFeatures:
        weight = self.head.last_layer.weight
        if query_features is None:
            return HeadFeatures(self.head.features(cls_features), None, weight, None)
        if self.query_head is None:  # shared head, as in forward
            n_cls = cls_features.shape[0]
            features = self.head.features(torch.cat([cls_features, query_features.flatten(0, 2)]))
            queries = features[n_cls:].view(*query_features.shape[:3], -1)
            return HeadFeatures(features[:n_cls], queries, weight, weight)
        queries = self.query_head.features(query_features)
        return HeadFeatures(self.head.features(cls_features), queries, weight, self.query_head.last_layer.weight)
