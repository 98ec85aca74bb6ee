"""Kernel microbenchmark: ADCLR attention against its peers, side by side on the same tensors.

    python -m bench.attention                         # real ViT shapes, bf16 + fp16, every rule (GPU)
    python -m bench.attention --sweep                 # also a sweep over L
    python -m bench.attention --device cpu --tiny     # smoke test of the harness (no meaningful timings)

Median time (CUDA events via triton.testing.do_bench, after warm-up, rotating through input sets
larger than L2 so the cache is not what gets measured), TFLOP/s of the layout's useful work,
achieved GB/s against the fewest bytes, peak extra memory, max error against float64, and each
provider's time as a ratio to ours (> 1: ours is faster). Writes attention.md / .csv / .png under
``bench/results/<date>_<device>/``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from adclr.kernels import QUERY_KEY_RULES, AttentionLayout, reference_attention
from bench.providers import attention_bytes, attention_flops, make_providers
from bench.report import Report
from bench.shapes import VIT_SHAPES

TINY_SHAPES = {"tiny": (2, 2, 13, 4, 16)}
SWEEP_TOKENS = 128 * 207  # batch * L held near ViT-S/16 global's, so every point fills the GPU
SWEEP_LENGTHS = (47, 128, 256, 512, 1024, 2048, 4096)
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CACHE_BYTES = 3 * 64 * 2**20  # rotate through at least this much input (H100/H200 L2: 50-60 MB)


def input_sets(batch, heads, length, head_dim, dtype, device, count):
    sets = []
    for _ in range(count):
        q, k, v = (
            torch.randn(batch, heads, length, head_dim, dtype=dtype, device=device).requires_grad_() for _ in range(3)
        )
        sets.append((q, k, v, torch.randn_like(q)))
    return sets


def timed_median_ms(fn, device, grad_to_none) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    fn()  # CPU smoke runs: a couple of wall-clock repeats, for the harness rather than the numbers
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def benchmark_provider(provider, sets, mode: str, device) -> float:
    """Median milliseconds of ``mode`` for ``provider``, cycling through the input ``sets``."""
    counter = iter(range(10**12))
    leaves = [t for s in sets for t in s[:3]]
    if mode == "fwd":
        detached = [[t.detach() for t in s[:3]] for s in sets]

        def fn():
            with torch.no_grad():
                provider(*detached[next(counter) % len(sets)])
    elif mode == "fwd+bwd":

        def fn():
            q, k, v, do = sets[next(counter) % len(sets)]
            provider(q, k, v).backward(do)
    else:
        outputs = [provider(q, k, v) for q, k, v, _ in sets]

        def fn():
            i = next(counter) % len(sets)
            outputs[i].backward(sets[i][3], retain_graph=True)

    return timed_median_ms(fn, device, leaves)


def peak_extra_mib(provider, q, k, v, do, device) -> float:
    """Peak memory of one forward+backward above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    provider(q, k, v).backward(do)
    torch.cuda.synchronize()
    for t in (q, k, v):
        t.grad = None
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def run_case(name, batch, heads, R, Q, head_dim, rule, dtype_name, modes, device, compile_flex, report: Report):
    layout = AttentionLayout(R, Q, 1, rule) if rule != "bidirectional" else AttentionLayout(R, Q, 1, bidirectional=True)
    dtype, scale = DTYPES[dtype_name], head_dim**-0.5
    providers, missing = make_providers(layout, scale, device, dtype, compile_flex)
    set_bytes = 4 * batch * heads * layout.length * head_dim * torch.finfo(dtype).bits // 8
    sets = input_sets(
        batch,
        heads,
        layout.length,
        head_dim,
        dtype,
        device,
        count=max(2, min(6, math.ceil(CACHE_BYTES / set_bytes))) if device.type == "cuda" else 1,
    )
    q, k, v, do = sets[0]
    q0, k0, v0 = (t.detach() for t in (q, k, v))
    truth = reference_attention(q0.double(), k0.double(), v0.double(), layout, scale)
    for provider_name, why in missing.items():
        report.note(f"{name} {rule} {dtype_name}: {provider_name} skipped ({why})")
    for mode in modes:
        times = {}
        for provider_name, provider in providers.items():
            try:
                times[provider_name] = benchmark_provider(provider, sets, mode, device)
            except Exception as error:  # noqa: BLE001 - a peer that fails on this case is reported, not fatal
                report.note(
                    f"{name} {rule} {dtype_name} {mode}: {provider_name} failed: {type(error).__name__}: {error}"
                )
        for provider_name, ms in times.items():
            provider = providers[provider_name]
            with torch.no_grad():
                error = (
                    float("nan")
                    if provider_name == "full_sdpa"
                    else (provider(q0, k0, v0).double() - truth).abs().max().item()
                )
            report.add(
                dict(
                    shape=name,
                    batch=batch,
                    heads=heads,
                    L=layout.length,
                    R=R,
                    Q=Q,
                    D=head_dim,
                    rule=rule,
                    dtype=dtype_name,
                    mode=mode,
                    provider=provider_name,
                    ms=ms,
                    tflops=attention_flops(layout, batch, heads, head_dim, mode) / (ms * 1e-3) / 1e12,
                    gbps=attention_bytes(batch, heads, layout.length, head_dim, torch.finfo(dtype).bits // 8, mode)
                    / (ms * 1e-3)
                    / 1e9,
                    peak_mib=peak_extra_mib(provider, q, k, v, do, device) if mode == "fwd+bwd" else float("nan"),
                    max_err=error,
                    ratio_to_ours=ms / times["ours"] if "ours" in times else float("nan"),
                )
            )


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes only (CPU smoke test)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(VIT_SHAPES), default=sorted(VIT_SHAPES))
    parser.add_argument(
        "--rules", nargs="+", choices=list(QUERY_KEY_RULES) + ["bidirectional"], default=list(QUERY_KEY_RULES)
    )
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--sweep", action="store_true", help="also sweep L at constant tokens (prefix+raw, bf16)")
    parser.add_argument("--output_dir", help="default: bench/results/<date>_<device>/")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("on CPU the Triton provider needs TRITON_INTERPRET=1 (set it before starting Python)")

    report = Report("attention", args.output_dir, device)
    shapes = TINY_SHAPES if args.tiny else {k: VIT_SHAPES[k] for k in args.shapes}
    dtypes = ["fp32"] if device.type == "cpu" else args.dtypes
    compile_flex = device.type == "cuda"
    for name, (batch, heads, R, Q, head_dim) in shapes.items():
        for dtype_name in dtypes:
            for rule in args.rules:
                run_case(name, batch, heads, R, Q, head_dim, rule, dtype_name, args.modes, device, compile_flex, report)
    if args.sweep and not args.tiny:
        for length in SWEEP_LENGTHS:
            batch = max(1, SWEEP_TOKENS // length)
            run_case(
                f"sweep_L{length}",
                batch,
                6,
                length - 10,
                10,
                64,
                "prefix+raw",
                "bf16",
                ["fwd+bwd"],
                device,
                compile_flex,
                report,
            )
    return report.write(plot_x="L" if args.sweep else None)


if __name__ == "__main__":
    print(f"results in {main()}")
