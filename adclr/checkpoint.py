"""Rebuild a trained backbone from a ``train.py`` checkpoint (for export and visualisation)."""

from __future__ import annotations

import torch

from .model import ADCLRVisionTransformer, build_vit

BRANCHES = ("teacher", "student")


def load_backbone(checkpoint: str, branch: str = "teacher") -> tuple[ADCLRVisionTransformer, dict]:
    """The ``branch`` backbone of ``checkpoint`` in eval mode, and the run's arguments."""
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    args = state["args"]
    backbone = build_vit(
        args["arch"],
        args["patch_size"],
        args["global_size"],
        query_keys=args["query_keys"],
        bidirectional=args["bidirectional"],
        attn_backend="reference",
    )
    prefix = "backbone."
    backbone.load_state_dict({k[len(prefix) :]: v for k, v in state[branch].items() if k.startswith(prefix)})
    return backbone.eval(), args
