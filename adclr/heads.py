"""DINO's projection head, shared by the CLS and query tokens unless a separate query head is asked for."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP (``nlayers``, GELU) -> bottleneck -> L2 normalisation -> weight-normalised linear layer.

    ``norm_last_layer`` freezes the weight norm's magnitude at 1 (DINO's default for stability).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1)
        magnitude.requires_grad = not norm_last_layer

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck: what the last layer maps to the K outputs."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.features(x))


@dataclass
class HeadFeatures:
    """The heads' inputs to their last layer, for a loss that applies the last layer itself (fused).

    ``weight`` is the effective weight-normalised last layer ``[K, bottleneck]``, computed through its
    parametrisation so that gradients reach its direction and magnitude by autograd.
    """

    cls: torch.Tensor  # [crops*B, bottleneck], crop-major like the logits
    queries: torch.Tensor | None  # [query views, B, Q, bottleneck], None without query crops
    weight: torch.Tensor  # [K, bottleneck], the CLS head's last layer
    query_weight: torch.Tensor | None  # the query tokens' last layer (``weight`` itself when shared)
