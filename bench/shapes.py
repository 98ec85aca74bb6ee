"""The attention shapes of real ViT pretraining, shared by the benchmarks, the tuner and the GPU tests."""

# name -> (batch, heads, R, Q, head_dim): ViT-S/16 global 224 px, its 96 px local crops, ViT-B/16, ViT-S/8.
VIT_SHAPES = {
    "vit_s16_global": (128, 6, 197, 10, 64),
    "vit_s16_local96": (512, 6, 37, 10, 64),
    "vit_b16_global": (64, 12, 197, 10, 64),
    "vit_s8_global": (32, 6, 785, 10, 64),
}
