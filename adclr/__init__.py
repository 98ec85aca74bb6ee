"""ADCLR: DINO with query crops and unidirectional cross-attention (Zhang et al., ICLR 2023)."""

__version__ = "0.1.0"
