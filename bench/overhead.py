"""The Python cost of one fused-attention call, with the kernel launches stubbed out (no GPU needed).

    python -m bench.overhead                 # L = 47 (a 96 px crop), packed qkv, prefix+raw
    python -m bench.overhead --path model    # the call a ViT block makes
    python -m bench.overhead --length 207 --repeats 5000

Times one call per iteration, forward (under ``no_grad``) and forward + backward (``.backward`` on
its output), with every ``Launch`` built as usual but not run: what is left is the checks, plan
resolution, output allocation and autograd, i.e. what a GPU call pays on the host before and around
its kernels. ``--path``: ``public`` is ``adclr_attention_packed(..., backend="triton")``; ``model``
is the path ``adclr.model``'s attention takes (``model_attention_packed``: no checks of the backend
name, shapes and scale); ``floor`` is an ``autograd.Function`` that only allocates its output and
its gradient, the least any custom op pays in the same loop on the same machine. Targets (issue 19):
<= 25 us forward, <= 80 us forward + backward. The median of ``--rounds`` rounds of ``--repeats``
calls is printed, in CPU time of this process (run it with ``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend accepts CPU tensors (nothing runs)

import torch  # noqa: E402

from adclr.kernels import AttentionLayout, adclr_attention_packed  # noqa: E402
from adclr.kernels import triton_attention as ops  # noqa: E402
from adclr.kernels.attention import model_attention_packed  # noqa: E402

TARGET_US = {"fwd": 25.0, "fwd+bwd": 80.0}
PATHS = ("public", "model", "floor")


class _Floor(torch.autograd.Function):
    """Allocates the output forward and the gradient backward, nothing else."""

    @staticmethod
    def forward(ctx, qkv):
        return qkv.new_empty((*qkv.shape[:2], *qkv.shape[3:]))

    @staticmethod
    def backward(ctx, do):
        return do.new_empty((*do.shape[:2], 3, *do.shape[2:]))


def attention_call(path: str, layout: AttentionLayout, scale: float):
    """The call ``path`` names, as a function of ``qkv``."""
    if path == "public":
        return lambda qkv: adclr_attention_packed(qkv, layout, backend="triton")
    if path == "model":  # as ADCLRAttention calls it, with the scale it holds
        return lambda qkv: model_attention_packed(qkv, layout, scale, 0.0, "triton")
    return _Floor.apply


def per_call_us(fn, repeats: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean CPU time (``time.process_time``: this process's own, so other
    work on a shared machine does not inflate it) of ``repeats`` calls, in microseconds."""
    for _ in range(max(10, repeats // 10)):
        fn()
    times = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(repeats):
            fn()
        times.append((time.process_time() - start) / repeats * 1e6)
    return statistics.median(times)


def measure(length: int, num_query: int, rule: str, repeats: int, rounds: int, path: str = "public"):
    """``{"fwd": us, "fwd+bwd": us}`` per call with launches stubbed (``Launch.__call__`` a no-op)."""
    layout = AttentionLayout(length - num_query, num_query, 1, rule)
    qkv = torch.randn(2, length, 3, 6, 64, dtype=torch.float16)
    grad_qkv = qkv.clone().requires_grad_()
    do = torch.randn(2, length, 6, 64, dtype=torch.float16)
    call = attention_call(path, layout, 64**-0.5)

    def forward():
        with torch.no_grad():
            call(qkv)

    def forward_backward():
        call(grad_qkv).backward(do)
        grad_qkv.grad = None

    real_call = ops.Launch.__call__
    ops.Launch.__call__ = lambda self: None
    try:
        return {"fwd": per_call_us(forward, repeats, rounds), "fwd+bwd": per_call_us(forward_backward, repeats, rounds)}
    finally:
        ops.Launch.__call__ = real_call


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=47, help="L = R + Q (default 47)")
    parser.add_argument("--num_query", type=int, default=10)
    parser.add_argument("--rule", default="prefix+raw")
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--path", choices=PATHS, default="public", help="which call (see above)")
    args = parser.parse_args(argv)
    if args.length <= args.num_query or args.repeats < 1 or args.rounds < 1:
        parser.error("need --length > --num_query >= 0, --repeats >= 1, --rounds >= 1")
    result = measure(args.length, args.num_query, args.rule, args.repeats, args.rounds, args.path)
    print(f"{args.path} path per call, launches stubbed (L = {args.length}, {args.rule}, torch {torch.__version__}):")
    for mode, us in result.items():
        print(f"  {mode:8} {us:7.1f} us   (target <= {TARGET_US[mode]:.0f} us)")


if __name__ == "__main__":
    main()
