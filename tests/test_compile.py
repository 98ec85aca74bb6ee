"""The kernels compile for real GPU targets, offline (Triton ships ptxas): the CPU interpreter never
takes the compiler's path, so this is what catches a kernel that would fail only on a GPU."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch, dtypes", [(90, ["bf16", "fp32"]), (80, ["fp16"]), (70, ["fp16"])])
def test_kernels_compile_for_gpu_targets(arch, dtypes):
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": ROOT}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.compile_check",
            "--arch",
            str(arch),
            "--dtypes",
            *dtypes,
            "--head_dims",
            "64",
            "80",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "0 failed" in result.stdout
