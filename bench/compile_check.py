"""Compile the ADCLR kernels for GPU architectures without a GPU, and report what each costs.

    python -m bench.compile_check                           # sm90/80/70; fp16/bf16/fp32; D 64/80/128; every variant
    python -m bench.compile_check --arch 90 --dtypes bf16 --head_dims 64 --kernels v2_fwd fused short
    python -m bench.compile_check --arch 90 --tiles fused=64x32w4s2 v2_fwd=128x64w8s3   # candidate tiles

What is compiled is exactly what a real ViT call specialises to: the arguments come from the
launchers themselves (``forward_launches`` / ``backward_launches``) applied to a packed
``qkv [B, L, 3, H, D]`` as the model passes it, and Triton's own JIT binder derives the signature,
the divisibility of every pointer and stride (all multiples of 16 at ViT shapes, so loads are 16-byte
vectors and cp.async-pipelined) and the constexprs, before ``triton.compile`` runs for
``sm_<arch>`` with Triton's bundled ptxas. The CPU interpreter never takes this path, so this also
catches kernels that would fail only on a GPU.

Per kernel: registers per thread, spill (stack) bytes, shared memory, whether the loads are
cp.async-pipelined, which matrix instruction carries ``tl.dot`` (wgmma, mma.sync or FMA), and the
resident CTAs per SM that registers, shared memory and warps allow.

An offline tool, not on any GPU or training path: it drives Triton's compiler through private
interfaces (``JITFunction._pack_args``, ``triton.runtime.jit.create_function_from_signature``,
``triton.compiler.ASTSource`` / ``make_backend``), which change between Triton releases (written
against 3.6 to 3.8; ``tests/test_compile.py`` fails first when a release breaks them).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from adclr.kernels import device as kernel_device
from adclr.kernels import plans
from adclr.kernels import triton_attention as ops
from bench.common import DTYPES

KERNELS = ("v2_fwd", "fused", "short")
VIT_LENGTHS = (47, 207, 795)  # the attention lengths of ViT pretraining (96 px, 224 px at /16, 224 px at /8)
HEADS = 6
# Per SM: shared memory a CTA may use (opt-in maximum), register file, resident warps and CTAs.
SHARED_LIMIT_KB = {70: 96, 75: 64, 80: 163, 86: 99, 89: 99, 90: 227}
SM_SHARED_KB = {70: 96, 75: 64, 80: 164, 86: 100, 89: 100, 90: 228}
SM_WARPS = {70: 64, 75: 32, 80: 64, 86: 48, 89: 48, 90: 64}
SM_CTAS = {70: 32, 75: 16, 80: 32, 86: 16, 89: 24, 90: 32}


@dataclasses.dataclass(frozen=True)
class Case:
    arch: int
    dtype: str
    head_dim: int
    query_self: bool
    seq_len: int
    kernel: str
    tiles: plans.Tiles | None

    def label(self) -> str:
        flags = f"D{self.head_dim:<3} self={self.query_self!s:5} L{self.seq_len:<4}"
        return f"sm{self.arch} {self.kernel:7} {self.dtype:4} {flags}"


def _plan_for(kernel: str, seq_len: int, head_dim: int, dtype: torch.dtype, overrides: dict) -> plans.Plan:
    plan = plans.default_plan(seq_len, head_dim, dtype)
    if kernel == "v2_fwd":
        return dataclasses.replace(plan, fwd="v2", fwd_tiles=overrides.get("v2_fwd", plan.fwd_tiles))
    if kernel == "short":
        tiles = overrides.get("short", plans.short_tiles(seq_len, head_dim))
        return dataclasses.replace(plan, bwd="short", bwd_tiles=tiles)
    fused = plans.fused_tiles(seq_len, head_dim, dtype)
    return dataclasses.replace(plan, bwd="fused", bwd_tiles=overrides.get("fused", fused))


def real_launch(case: Case, overrides: dict) -> ops.Launch:
    """The launch a packed-qkv call of this case makes, on CPU tensors of the real strides."""
    dtype = DTYPES[case.dtype]
    qkv = torch.zeros(1, case.seq_len, 3, HEADS, case.head_dim, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    num_query = 10 if case.seq_len > 10 else 0
    # self=False: the default rule prefix+raw; self=True: raw+self (the prefix hidden from query rows too).
    query_self = case.query_self and num_query > 0
    params = (case.seq_len - num_query, 1 if query_self else 0, query_self)
    plan = _plan_for(case.kernel, case.seq_len, case.head_dim, dtype, overrides)
    capability = divmod(case.arch, 10)
    _, o, lse = ops.forward_outputs(q, seq_major=True)
    if case.kernel.endswith("fwd"):
        launches = ops.forward_launches(q, k, v, o, lse, params, case.head_dim**-0.5, plan, capability)
    else:
        do = torch.zeros(1, case.seq_len, HEADS, case.head_dim, dtype=dtype).transpose(1, 2)
        _, (dq, dk, dv) = ops.gradient_outputs(q, seq_major=True)
        launches = ops.backward_launches(do, q, k, v, o, lse, dq, dk, dv, params, case.head_dim**-0.5, plan, capability)
    (launch,) = [x for x in launches if x.name == case.kernel]
    return launch


def compile_launch(launch: ops.Launch, arch: int):
    """``triton.compile`` of what ``launch`` would JIT-compile on an ``sm_<arch>`` GPU."""
    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.launch_kwargs(), "debug": bool(fn.debug or triton.knobs.runtime.debug)}
    mode = getattr(getattr(triton.knobs, "compilation", None), "instrumentation_mode", None)
    if mode is not None:
        kwargs["instrumentation_mode"] = mode
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def cubin_resources(kernel) -> tuple[int, int]:
    """(registers per thread, spill stack bytes) read from the cubin by cuobjdump."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        report = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    field = lambda name: int(m.group(1)) if (m := re.search(rf"{name}:(\d+)", report)) else -1  # noqa: E731
    return field("REG"), field("STACK")


def matrix_instruction(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "fma"


def ctas_per_sm(arch: int, regs: int, warps: int, shared_bytes: int) -> int:
    """Resident CTAs per SM: registers (allocated per warp in units of 256), shared memory (plus the
    1 KB each CTA reserves), warps and the CTA limit."""
    by_regs = 65536 // (((max(regs, 1) * 32 + 255) // 256) * 256 * warps)
    by_shared = SM_SHARED_KB.get(arch, 96) * 1024 // (shared_bytes + 1024)
    return min(by_regs, by_shared, SM_WARPS.get(arch, 64) // warps, SM_CTAS.get(arch, 16))


def parse_tiles(text: str) -> tuple[str, plans.Tiles]:
    """``fused=64x32w4s2`` -> ("fused", Tiles(64, 32, 4, 2)); ``short=w8s1`` for the short backward."""
    m = re.fullmatch(r"(\w+)=(?:(\d+)x(\d+))?w(\d+)s(\d+)", text)
    if not m or m.group(1) not in ("v2_fwd", "fused", "short"):
        raise argparse.ArgumentTypeError(
            f"expected KERNEL=MxNwWsS (KERNEL one of v2_fwd, fused) or short=wWsS, got {text}"
        )
    tiles = plans.Tiles(int(m.group(2) or 0), int(m.group(3) or 0), int(m.group(4)), int(m.group(5)))
    tiles.check()
    return m.group(1), tiles


def cases(args) -> list[Case]:
    """Every requested compile, once per distinct launch (a kernel's tiles differ by L bucket only)."""
    out, seen = [], set()
    overrides = dict(args.tiles)
    for arch in args.arch:
        for dtype in args.dtypes:
            if arch < 80 and dtype == "bf16":
                continue  # the API refuses bf16 below sm80
            for head_dim in args.head_dims:
                if dtype == "fp32" and head_dim > 128:
                    continue  # the API refuses fp32 head dims above 128
                for query_self in args.self:
                    for kernel in args.kernels:
                        for seq_len in args.lengths:
                            if kernel == "short" and (dtype == "fp32" or not plans.short_eligible(seq_len, head_dim)):
                                continue  # no plan runs fp32 in one tile (its exact products spill there)
                            case = Case(arch, dtype, head_dim, query_self, seq_len, kernel, None)
                            launch = real_launch(case, overrides)
                            identity = (arch, dtype, head_dim, query_self, kernel, str(launch.constexprs), launch.tiles)
                            if identity not in seen:
                                seen.add(identity)
                                out.append(dataclasses.replace(case, tiles=launch.tiles))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80, 70])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16", "fp32"])
    parser.add_argument("--head_dims", type=int, nargs="+", default=[64, 80, 128])
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--lengths", type=int, nargs="+", default=list(VIT_LENGTHS), help="sequence lengths (tiles)")
    parser.add_argument(
        "--self", type=lambda s: s == "true", nargs="+", default=[False, True], help="QUERY_SELF values (true/false)"
    )
    parser.add_argument(
        "--tiles", type=parse_tiles, nargs="+", default=[], help="tiles to compile instead of the table"
    )
    args = parser.parse_args(argv)
    if kernel_device.interpreter_enabled():
        raise SystemExit("bench.compile_check compiles for GPUs: run it without TRITON_INTERPRET=1")

    todo = cases(args)
    print(f"triton {triton.__version__}; {len(todo)} compiles", flush=True)
    print(f"{'case':52} {'tiles':>15} {'regs':>5} {'spill':>6} {'smem KB':>8} {'pipe':>5} {'mma':>6} {'CTA/SM':>6}")
    failures, worst_regs, spills, start = 0, 0, [], time.time()
    for case in todo:
        label = f"{case.label():52} {str(case.tiles):>15}"
        try:
            kernel = compile_launch(real_launch(case, dict(args.tiles)), case.arch)
        except Exception as error:  # noqa: BLE001 - report every failing combination
            failures += 1
            print(f"{label} FAILED: {type(error).__name__}: {str(error).splitlines()[0][:120]}", flush=True)
            continue
        regs, stack = cubin_resources(kernel)
        shared = kernel.metadata.shared
        warps = kernel.metadata.num_warps
        over = shared / 1024 > SHARED_LIMIT_KB.get(case.arch, 96)
        failures += over
        worst_regs = max(worst_regs, regs)
        if stack > 0:
            spills.append(f"{case.label().split()[1]} sm{case.arch} {case.dtype} D{case.head_dim} ({stack} B)")
        ptx = kernel.asm["ptx"]
        pipelined = "yes" if "cp.async" in ptx else "no"
        print(
            f"{label} {regs:>5} {stack:>6} {shared / 1024:>8.1f} {pipelined:>5} {matrix_instruction(ptx):>6} "
            f"{ctas_per_sm(case.arch, regs, warps, shared):>6}" + ("  OVER THE SHARED-MEMORY LIMIT" if over else ""),
            flush=True,
        )
    print(
        f"summary: {len(todo)} compiled in {time.time() - start:.0f} s; worst registers {worst_regs}/thread; "
        f"{len(spills)} spilling{': ' + ', '.join(spills) if spills else ''}; {failures} failed"
    )
    return failures


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
