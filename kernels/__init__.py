"""ADCLR attention and loss kernels, installed as ``adclr.kernels``.

``AttentionLayout`` defines who attends to whom; ``adclr_attention`` / ``adclr_attention_packed``
run it on the fused Triton kernel (CUDA sm80+), exact SDPA, or the explicit reference. Which kernel
variant and tiles run, and whether ``auto`` prefers SDPA for a shape, comes from ``plans`` (per-GPU
tuned tables under ``kernels/tiles/``, else built-in defaults). ``dino_teacher_probs`` /
``dino_soft_cross_entropy_`` are the DINO loss's row operations (Triton on CUDA, PyTorch elsewhere)
that ``adclr.fused_loss`` runs between the head's chunked matmuls.
"""

from .attention import BACKENDS, adclr_attention, adclr_attention_packed, triton_is_default
from .device import interpreter_enabled
from .dino_loss import LOSS_BACKENDS, dino_soft_cross_entropy_, dino_teacher_probs
from .layout import LAYOUT_NAMES, QUERY_KEY_RULES, AttentionLayout
from .reference import reference_attention, reference_probabilities
from .sdpa import sdpa_attention

__all__ = [
    "BACKENDS",
    "LAYOUT_NAMES",
    "LOSS_BACKENDS",
    "QUERY_KEY_RULES",
    "AttentionLayout",
    "adclr_attention",
    "adclr_attention_packed",
    "dino_soft_cross_entropy_",
    "dino_teacher_probs",
    "interpreter_enabled",
    "reference_attention",
    "reference_probabilities",
    "sdpa_attention",
    "triton_is_default",
]
