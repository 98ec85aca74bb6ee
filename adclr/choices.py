"""The names users choose among: architectures, attention and loss backends, query-key rules, precisions.

Kept free of torch so that ``train.py`` can check its flags before importing it; ``adclr.model`` and
``adclr.kernels`` take these from here, so the command line and the library accept the same names.
"""

ARCHS = {
    "vit_pico": dict(embed_dim=96, depth=4, num_heads=3),  # CPU-sized, for the built-in data and tests
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}
ATTN_BACKENDS = ("auto", "triton", "sdpa", "reference")
QUERY_KEY_RULES = ("prefix+raw", "raw", "prefix+raw+self", "raw+self")  # docs/token-layout.md
PRECISIONS = ("fp32", "bf16", "fp16")  # fp32 runs without autocast
LOSS_BACKENDS = ("auto", "triton", "torch")  # the fused loss's row operations (adclr.kernels.dino_loss)
