"""The microbenchmark cases as pytest-benchmark tests: ``pytest bench/ --benchmark-only`` (needs CUDA).

Each timed call synchronises CUDA so the benchmark measures the work, not the launch.
"""

import pytest
import torch

from adclr.kernels import AttentionLayout
from bench.common import VIT_SHAPES
from bench.providers import make_providers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA device")

PROVIDERS = ("ours", "paper", "sdpa_mask", "sdpa_sliced", "flex", "xformers", "full_sdpa")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider_name", PROVIDERS)
@pytest.mark.parametrize("shape", sorted(VIT_SHAPES))
def test_attention(benchmark, shape, provider_name, mode):
    batch, heads, R, Q, head_dim = VIT_SHAPES[shape]
    layout = AttentionLayout(R, Q)
    providers, missing = make_providers(layout, head_dim**-0.5, torch.device("cuda"), torch.bfloat16)
    if provider_name in missing:
        pytest.skip(missing[provider_name])
    provider = providers[provider_name]
    q, k, v = (
        torch.randn(
            batch, heads, layout.length, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=mode != "fwd"
        )
        for _ in range(3)
    )
    do = torch.randn_like(q)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                provider(q, k, v)
        else:
            provider(q, k, v).backward(do)
        torch.cuda.synchronize()

    run()  # compile / autotune outside the measurement
    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
