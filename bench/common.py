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


MIN_REPS = 50  # timed repetitions per candidate on a GPU (do_bench's 10 ms gave the L = 795 backward 3)
CPU_REPS = 2  # CPU smoke runs time the harness, not the kernels


def interleaved_ms(fns: dict, device, reps: int = MIN_REPS, grad_to_none=None) -> dict:
    """Median milliseconds of each of ``fns`` (name -> callable), all timed in one interleaved run:
    repetition r calls every function once, the order rotated by r, so that a clock or temperature
    drift during the run biases none of them. On CUDA each call is bracketed by CUDA events with the
    L2 cache flushed before it (as ``triton.testing.do_bench``), ``reps`` repetitions after one
    warm-up call each; on CPU ``CPU_REPS`` wall-clock repetitions. ``grad_to_none``: tensors whose
    ``.grad`` is reset before each call."""
    names = list(fns)
    cuda = torch.device(device).type == "cuda"
    reps = reps if cuda else CPU_REPS

    def call(name):
        for t in grad_to_none or ():
            t.grad = None
        fns[name]()

    for name in names:
        call(name)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if cuda else None
    samples = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if cuda:
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call(name)
                end.record()
                samples[name].append((start, end))
            else:
                begin = time.perf_counter()
                call(name)
                samples[name].append((time.perf_counter() - begin) * 1e3)
    if cuda:
        torch.cuda.synchronize()
        samples = {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in samples.items()}
    return {name: statistics.median(times) for name, times in samples.items()}


def warm_until_stable(device, max_s: float = 15.0, tolerance: float = 0.02, log=print) -> float:
    """Keep the GPU busy with bf16 matrix products until three consecutive batches take the same time
    within ``tolerance`` (an idle card sits at a low clock and ramps up under load), at most ``max_s``
    seconds; returns the seconds spent (0 on CPU)."""
    if torch.device(device).type != "cuda":
        return 0.0
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device=device)
    begin = time.perf_counter()
    batches = []
    while time.perf_counter() - begin < max_s:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            a @ a
        end.record()
        end.synchronize()
        batches.append(start.elapsed_time(end))
        last = batches[-3:]
        if len(last) == 3 and max(last) <= min(last) * (1 + tolerance):
            break
    spent = time.perf_counter() - begin
    log(f"GPU warm-up: {spent:.1f} s, {len(batches)} batches, last {batches[-1]:.2f} ms", flush=True)
    return spent
