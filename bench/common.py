"""What the benchmarks, the tuner and the tests share: the real ViT attention shapes, one benchmark
case, the dtype names, the accuracy rule's floor and the median timer."""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from adclr.kernels import AttentionLayout, plans

# name -> (batch, heads, R, Q, head_dim): ViT-S/16 global 224 px, its 96 px local crops, ViT-B/16, ViT-S/8.
VIT_SHAPES = {
    "vit_s16_global": (128, 6, 197, 10, 64),
    "vit_s16_local96": (512, 6, 37, 10, 64),
    "vit_b16_global": (64, 12, 197, 10, 64),
    "vit_s8_global": (32, 6, 785, 10, 64),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Additive floor on top of the accuracy rule "error against the truth at most 2x PyTorch's own in the
# same dtype": one unit in the last place at magnitude 1, so that an exact-zero PyTorch error (L = 1,
# say) does not demand bit-exactness. Used by the tests and by the tuner's gate alike.
ERROR_FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention call: ``batch x heads`` sequences of ``num_raw + num_query`` tokens under the
    layout named ``rule`` (a query-key rule or ``bidirectional``; one prefix token), in ``dtype``."""

    shape: str
    batch: int
    heads: int
    num_raw: int
    num_query: int
    head_dim: int
    rule: str
    dtype: str

    @property
    def layout(self) -> AttentionLayout:
        return AttentionLayout.named(self.rule, self.num_raw, self.num_query)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def key(self) -> plans.ShapeKey:
        """The tuned table's key of this call."""
        layout = self.layout
        return plans.shape_key(layout.length, self.head_dim, self.torch_dtype, layout.kernel_params)

    def label(self) -> str:
        return f"{self.shape} {self.rule} {self.dtype}"


def median_ms(fn, device, grad_to_none=None, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn``: on CUDA ``triton.testing.do_bench`` (CUDA events, L2 flushed
    between repetitions, ``warmup`` / ``rep`` in ms); on CPU two wall-clock repeats after one warm-up
    call (the smoke runs time the harness, not the kernels)."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")
    fn()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
