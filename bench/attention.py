"""Kernel microbenchmark: ADCLR attention against its peers, side by side on the same tensors.

    python -m bench.attention                         # real ViT shapes, bf16 + fp16, every rule (GPU)
    python -m bench.attention --sweep                 # also a sweep over L
    TRITON_INTERPRET=1 python -m bench.attention --device cpu --tiny   # smoke test of the harness

Each call is timed twice: eagerly (CUDA events via triton.testing.do_bench, after warm-up, rotating
through input sets larger than L2 so the cache is not what gets measured): the GPU work plus the
host time the GPU waits for; and as replays of a CUDA graph of the same call (L2 flushed before each):
the GPU work alone. ``ms`` is the GPU time (the eager time, marked in ``timing``, for a provider that
cannot be captured), ``eager_ms`` the eager one, ``python_ms`` their difference (the host's cost per
call). From ``ms``: TFLOP/s of the layout's useful work,
achieved GB/s against the fewest bytes, peak extra memory, max error against float64, and each
provider's time as a ratio to ours (> 1: ours is faster). The Markdown table and the CSV under
``bench/results/<date>_<device>/`` are rewritten after every case, so a run cut short keeps what it
measured. FlexAttention is compiled (once per shape and rule) and timed after every other provider
of every case; if the compiled call fails it is timed uncompiled and labelled ``flex_eager``.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from adclr.kernels import LAYOUT_NAMES, QUERY_KEY_RULES, reference_attention
from adclr.kernels import device as kernel_device
from bench.common import DTYPES, VIT_SHAPES, Case, Timing, graph_ms, median_ms
from bench.providers import attention_bytes, attention_flops, make_providers
from bench.report import Report

TINY_SHAPES = {"tiny": (2, 2, 13, 4, 16)}
SWEEP_TOKENS = 128 * 207  # batch * L held near ViT-S/16 global's, so every point fills the GPU
SWEEP_LENGTHS = (47, 128, 256, 512, 1024, 2048, 4096)
MODES = ("fwd", "bwd", "fwd+bwd")
CACHE_BYTES = 3 * 64 * 2**20  # rotate through at least this much input (H100/H200 L2: 50-60 MB)
CPU_COMMAND = "TRITON_INTERPRET=1 python -m bench.attention --device cpu --tiny"
FLEX = ("flex", "flex_eager")


def input_sets(batch, heads, length, head_dim, dtype, device, count):
    sets = []
    for _ in range(count):
        q, k, v = (
            torch.randn(batch, heads, length, head_dim, dtype=dtype, device=device).requires_grad_() for _ in range(3)
        )
        sets.append((q, k, v, torch.randn_like(q)))
    return sets


def _call(provider, sets, mode: str):
    """``call(i)``: ``mode`` of ``provider`` on input set ``i``."""
    if mode == "fwd":
        detached = [[t.detach() for t in s[:3]] for s in sets]

        def call(i):
            with torch.no_grad():
                provider(*detached[i])
    elif mode == "fwd+bwd":

        def call(i):
            q, k, v, do = sets[i]
            provider(q, k, v).backward(do)
    else:
        outputs = [provider(q, k, v) for q, k, v, _ in sets]

        def call(i):
            outputs[i].backward(sets[i][3], retain_graph=True)

    return call


def benchmark_provider(provider, sets, mode: str, device) -> Timing:
    """``mode`` of ``provider`` timed two ways: eagerly, cycling through the input ``sets`` (GPU work
    plus the host time the GPU waits for), and as replays of a CUDA graph of the call on the first set
    (the GPU work alone; L2 is flushed before every replay, so the fixed inputs are not cached). A
    call that cannot be captured gets its eager time only, and says why."""
    counter = iter(range(10**12))
    leaves = [t for s in sets for t in s[:3]]
    call = _call(provider, sets, mode)
    eager = median_ms(lambda: call(next(counter) % len(sets)), device, leaves, rep=50)
    replay, why = graph_ms(lambda: call(0), device, leaves)
    return Timing(eager, replay, why)


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


def run_case(
    case: Case, modes, device, compile_flex: bool, report: Report, ours_ms: dict, only=None, skip=()
) -> list[str]:
    """Time the providers of ``case`` in each of ``modes`` (those in ``only`` if given, none in
    ``skip``) and add a row per provider and mode; ``ours_ms`` carries our times to rows added later
    (the flex pass)."""
    layout = case.layout
    dtype, scale = case.torch_dtype, case.head_dim**-0.5
    providers, missing = make_providers(layout, scale, device, dtype, compile_flex)
    fallback = providers.pop("flex_eager") if "flex" in providers else None  # timed if the compiled flex fails
    set_bytes = 4 * case.batch * case.heads * layout.length * case.head_dim * torch.finfo(dtype).bits // 8
    count = max(2, min(6, math.ceil(CACHE_BYTES / set_bytes))) if device.type == "cuda" else 1
    sets = input_sets(case.batch, case.heads, layout.length, case.head_dim, dtype, device, count)
    q, k, v, do = sets[0]
    q0, k0, v0 = (t.detach() for t in (q, k, v))
    truth = reference_attention(q0.double(), k0.double(), v0.double(), layout, scale)
    if only is None:
        for provider_name, why in missing.items():
            report.note(f"{case.label()}: {provider_name} skipped ({why})")
    names = [n for n in providers if (only is None or n in only) and n not in skip]
    progress = []
    for mode in modes:
        times = {}
        for name in names:
            try:
                times[name] = benchmark_provider(providers[name], sets, mode, device)
            except Exception as error:  # noqa: BLE001 - a peer that fails on this case is reported, not fatal
                report.note(f"{case.label()} {mode}: {name} failed: {type(error).__name__}: {str(error)[:300]}")
                if name == "flex" and fallback is not None:  # the uncompiled peer, labelled as such
                    providers["flex_eager"] = fallback
                    times["flex_eager"] = benchmark_provider(fallback, sets, mode, device)
        if "ours" in times:
            ours_ms[(case, mode)] = times["ours"].gpu_ms
        for name, timing in times.items():
            ms = timing.gpu_ms
            provider = providers[name]
            with torch.no_grad():
                error = math.nan if name == "full_sdpa" else (provider(q0, k0, v0).double() - truth).abs().max().item()
            report.add(
                dict(
                    shape=case.shape,
                    batch=case.batch,
                    heads=case.heads,
                    L=layout.length,
                    R=case.num_raw,
                    Q=case.num_query,
                    D=case.head_dim,
                    rule=case.rule,
                    dtype=case.dtype,
                    mode=mode,
                    provider=name,
                    **timing.columns(),
                    tflops=attention_flops(layout, case.batch, case.heads, case.head_dim, mode) / (ms * 1e-3) / 1e12,
                    gbps=attention_bytes(
                        case.batch, case.heads, layout.length, case.head_dim, torch.finfo(dtype).bits // 8, mode
                    )
                    / (ms * 1e-3)
                    / 1e9,
                    peak_mib=peak_extra_mib(provider, q, k, v, do, device) if mode == "fwd+bwd" else float("nan"),
                    max_err=error,
                    ratio_to_ours=ms / ours_ms[(case, mode)] if (case, mode) in ours_ms else float("nan"),
                )
            )
        if times:
            progress.append(f"{mode} " + " ".join(f"{n} {t.gpu_ms:.3f}" for n, t in times.items()))
    return progress


def make_cases(args) -> list[tuple[Case, tuple]]:
    """``[(case, modes), ...]`` in the order they run."""
    shapes = TINY_SHAPES if args.tiny else {k: VIT_SHAPES[k] for k in args.shapes}
    dtypes = ["fp32"] if args.tiny else args.dtypes
    cases = [
        (Case(name, *shape, rule, dtype_name), tuple(args.modes))
        for name, shape in shapes.items()
        for dtype_name in dtypes
        for rule in args.rules
    ]
    if args.sweep and not args.tiny:
        for length in SWEEP_LENGTHS:
            batch = max(1, SWEEP_TOKENS // length)
            cases.append((Case(f"sweep_L{length}", batch, 6, length - 10, 10, 64, "prefix+raw", "bf16"), ("fwd+bwd",)))
    return cases


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes only (CPU smoke test)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(VIT_SHAPES), default=list(VIT_SHAPES))
    parser.add_argument("--rules", nargs="+", choices=LAYOUT_NAMES, default=list(QUERY_KEY_RULES))
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["fwd", "fwd+bwd"])
    parser.add_argument("--sweep", action="store_true", help="also sweep L at constant tokens (prefix+raw, bf16)")
    parser.add_argument("--no_flex", action="store_true", help="skip FlexAttention (its compiles take the longest)")
    parser.add_argument(
        "--budget_s",
        type=float,
        default=math.inf,
        help="start no new case after this many seconds, nor a flex case that would end past them at the pace "
        "of the slowest flex case so far (the first flex case needs the margin up to the caller's timeout)",
    )
    parser.add_argument("--output_dir", help="default: bench/results/<date>_<device>/")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    interpreting = kernel_device.interpreter_enabled()
    if device.type == "cpu" and not interpreting:
        raise SystemExit(f"on CPU the Triton kernel runs in the interpreter; the CPU smoke test is:\n  {CPU_COMMAND}")
    if device.type == "cuda" and interpreting:
        raise SystemExit("TRITON_INTERPRET=1 runs the kernels on the CPU: unset it to benchmark the GPU")
    if interpreting and not args.tiny:
        print("TRITON_INTERPRET=1: GPU-sized shapes would take hours in the interpreter; running the --tiny shapes")
        args.tiny = True

    report = Report("attention", args.output_dir, device)
    compile_flex = device.type == "cuda"
    cases, ours_ms, start = make_cases(args), {}, time.time()
    for i, (case, modes) in enumerate(cases, 1):
        if time.time() - start > args.budget_s:
            report.note(f"budget of {args.budget_s:.0f} s reached: {len(cases) - i + 1} cases not measured")
            break
        case_start = time.time()
        progress = run_case(case, modes, device, compile_flex, report, ours_ms, skip=FLEX)
        report.write(plot=False)
        print(
            f"[{i}/{len(cases)}] {case.label()}: {'; '.join(progress)} ms ({time.time() - case_start:.0f} s)",
            flush=True,
        )
    if not args.no_flex:  # last: one compile per shape, rule and mode, the slowest part of the run
        slowest = 0.0  # the longest flex case so far: a compile that would end past the budget is not started
        measured = [(c, m) for c, m in cases if any(key[0] == c for key in ours_ms)]
        for i, (case, modes) in enumerate(measured, 1):
            if time.time() - start + slowest > args.budget_s:
                report.note(
                    f"budget of {args.budget_s:.0f} s reached before flex of {case.label()} (the slowest flex case "
                    f"took {slowest:.0f} s): {len(measured) - i + 1} flex cases not measured"
                )
                break
            case_start = time.time()
            progress = run_case(case, modes, device, compile_flex, report, ours_ms, only=FLEX)
            report.write(plot=False)
            slowest = max(slowest, time.time() - case_start)
            print(
                f"[flex {i}/{len(measured)}] {case.label()}: {'; '.join(progress)} ms "
                f"({time.time() - case_start:.0f} s)",
                flush=True,
            )
    return report.write(plot_x="L" if args.sweep else None)


if __name__ == "__main__":
    print(f"results in {main()}")
