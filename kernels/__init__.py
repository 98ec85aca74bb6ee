"""ADCLR attention kernels, installed as ``adclr.kernels``.

``AttentionLayout`` defines who attends to whom; ``adclr_attention`` / ``adclr_attention_packed``
run it on the fused Triton kernel (CUDA sm80+), exact SDPA, or the explicit reference. Which kernel
variant and tiles run, and whether ``auto`` prefers SDPA for a shape, comes from ``plans`` (per-GPU
tuned tables under ``kernels/tiles/``, else built-in defaults).
"""

from .attention import BACKENDS, adclr_attention, adclr_attention_packed, interpreter_enabled, triton_is_default
from .layout import QUERY_KEY_RULES, AttentionLayout
from .reference import reference_attention, reference_probabilities
from .sdpa import sdpa_attention

__all__ = [
    "BACKENDS",
    "QUERY_KEY_RULES",
    "AttentionLayout",
    "adclr_attention",
    "adclr_attention_packed",
    "interpreter_enabled",
    "reference_attention",
    "reference_probabilities",
    "sdpa_attention",
    "triton_is_default",
]
