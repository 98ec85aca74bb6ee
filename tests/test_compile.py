"""The kernels compile for real GPU targets, offline (Triton ships ptxas): the CPU interpreter never
takes the compiler's path, so this is what catches a kernel that would fail only on a GPU, and what
keeps the ViT build free of spills. A handful of compiles (about twenty): CI has two cores."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow

V2 = ["v2_fwd", "fused", "short"]


def compile_check(*args: str) -> tuple[str, list[str]]:
    """Run bench.compile_check (no interpreter) and return its output and its per-kernel lines."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, "-m", "bench.compile_check", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"summary: .* 0 failed$", result.stdout.strip()), result.stdout[-2000:]
    return result.stdout, [line for line in result.stdout.splitlines() if line.startswith("sm")]


def test_vit_build_on_sm90_is_pipelined_on_wgmma_without_spills():
    """bf16, head dim 64, L = 47 / 207 / 795, with and without the diagonal: the real ViT calls."""
    out, lines = compile_check("--arch", "90", "--dtypes", "bf16", "--head_dims", "64", "--kernels", *V2)
    assert "0 spilling" in out, out
    assert len(lines) == 8  # forward: two tile sizes (L buckets); fused; short; each with and without +self
    for line in lines:
        pipelined, mma = line.split()[-3:-1]
        assert mma == "wgmma", line
        assert pipelined == ("no" if " short " in line else "yes"), line  # short has no loop to pipeline


@pytest.mark.parametrize(
    "arch, dtype, head_dim, kernels",
    [
        (90, "fp32", 64, ["v2_fwd", "fused"]),
        (80, "fp16", 80, V2),
        (70, "fp16", 64, V2),
    ],
)
def test_kernels_compile_for_gpu_targets(arch, dtype, head_dim, kernels):
    out, lines = compile_check(
        *("--arch", str(arch), "--dtypes", dtype, "--head_dims", str(head_dim), "--self", "true"),
        *("--lengths", "47", "--kernels", *kernels),
    )
    assert len(lines) == len(kernels) - (dtype == "fp32" and "short" in kernels)
    if arch == 90 and dtype == "fp32":
        assert "0 spilling" in out, out  # fp32's own tiles fit (tf32x3 products)
