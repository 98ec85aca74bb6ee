"""Compile every ADCLR kernel for a GPU architecture without a GPU, and report its resources.

    python -m bench.compile_check                  # sm90, sm80, sm70; fp16/bf16/fp32; head dims 64/80/128
    python -m bench.compile_check --arch 90 --head_dims 64

Triton compiles ahead of time for a named target with its bundled ptxas, so this catches compile
errors on the GPU path (which the CPU interpreter never takes) and shows, per kernel, the registers
per thread, stack (spill) bytes and shared memory of the tile table's configuration: METHOD.md's "read what costs
no device time". Uses the same tiles as the launcher (``_table_tiles``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from adclr.kernels import triton_attention as ops

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KERNELS = {"fwd": ops._fwd_kernel, "dkdv": ops._bwd_dkdv_kernel, "dq": ops._bwd_dq_kernel}
POINTERS = {"Q", "K", "V", "O", "LSE", "DO", "DELTA", "DK", "DV", "DQ"}
FP32_BUFFERS = {"LSE", "DELTA"}
FLOATS = {"qk_scale", "sm_scale"}
# Largest shared memory one block may use, per architecture (CUDA programming guide, opt-in maximum).
SHARED_LIMIT_KB = {70: 96, 75: 64, 80: 163, 86: 99, 89: 99, 90: 227}


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = "*fp32" if name in FP32_BUFFERS else f"*{dtype}"
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def compile_kernel(kind: str, dtype: str, head_dim: int, query_self: bool, arch: int):
    """Compile one kernel for ``sm_<arch>``; returns Triton's compiled kernel (``.asm``, ``.metadata``)."""
    fn = KERNELS[kind]
    tiles = ops._table_tiles(kind, head_dim, DTYPES[dtype])
    constexprs = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        QUERY_SELF=query_self,
        PRECISION=ops.dot_precision(DTYPES[dtype], divmod(arch, 10)),
        BLOCK_M=tiles["BLOCK_M"],
        BLOCK_N=tiles["BLOCK_N"],
    )
    # Pointers 16-byte aligned and sequence strides multiples of 16 elements, as for real ViT tensors.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if name in POINTERS or name.startswith("stride_") and not name.endswith("l")
    }
    source = ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def cubin_resources(kernel) -> tuple[int, int, int]:
    """(registers per thread, spill bytes, static shared bytes) read from the cubin by cuobjdump."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        report = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    field = lambda name: int(m.group(1)) if (m := re.search(rf"{name}:(\d+)", report)) else -1  # noqa: E731
    return field("REG"), field("STACK"), field("SHARED")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80, 70])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16", "fp32"])
    parser.add_argument("--head_dims", type=int, nargs="+", default=[64, 80, 128])
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}")
    print(
        f"{'arch':>5} {'kernel':6} {'dtype':5} {'D':>4} {'self':5} {'tiles':>14} "
        f"{'regs':>5} {'stack':>6} {'smem KB':>8}"
    )
    failures = 0
    for arch in args.arch:
        for dtype in args.dtypes:
            if arch < 80 and dtype == "bf16":
                continue  # refused by the API below sm80
            for head_dim in args.head_dims:
                if dtype == "fp32" and head_dim > 128:
                    continue  # refused by the API (MAX_TRITON_HEAD_DIM_FP32)
                for query_self in (False, True):
                    for kind in KERNELS:
                        tiles = ops._table_tiles(kind, head_dim, DTYPES[dtype])
                        label = f"{tiles['BLOCK_M']}x{tiles['BLOCK_N']} w{tiles['num_warps']} s{tiles['num_stages']}"
                        try:
                            kernel = compile_kernel(kind, dtype, head_dim, query_self, arch)
                        except Exception as error:  # noqa: BLE001 - report every failing combination
                            failures += 1
                            print(
                                f"{arch:>5} {kind:6} {dtype:5} {head_dim:>4} {query_self!s:5} {label:>14} FAILED: "
                                f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                            )
                            continue
                        regs, stack, _ = cubin_resources(kernel)
                        smem = kernel.metadata.shared / 1024  # dynamic shared memory Triton requests
                        over = smem > SHARED_LIMIT_KB.get(arch, 96)
                        failures += over
                        print(
                            f"{arch:>5} {kind:6} {dtype:5} {head_dim:>4} {query_self!s:5} {label:>14} "
                            f"{regs:>5} {stack:>6} {smem:>8.1f}" + ("  OVER THE SHARED-MEMORY LIMIT" if over else "")
                        )
    print(f"{failures} failed")
    return failures


if __name__ == "__main__":
    raise SystemExit(1 if main() else 0)
