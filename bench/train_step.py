"""End-to-end: one full multi-crop ADCLR training step per attention backend, against DINO.

    python -m bench.train_step                        # ViT-S/16, batch 64, 2x224 + 10x96 crops, Q = 10, bf16 (GPU)
    python -m bench.train_step --device cpu --tiny    # smoke test of the harness

Every variant runs ``adclr.train_step.training_step`` (the trainer's own iteration: teacher and student
forward, ADCLR loss, backward, clipping, AdamW, EMA) on the same model and the same random crops.
"DINO" is the same model and loss with no query tokens. ``*_fused`` variants apply the heads' last
layer inside the chunked fused loss (``--fused_loss true``); the others use the unfused reference
loss. Reports the median step time (CUDA events around each step, after warm-up), images/s, peak
memory and each variant's ratio to the unfused DINO step.

    python -m bench.train_step --variants dino dino_fused triton triton_fused --loss_backend torch
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from adclr import train_step
from adclr.config import TrainConfig, make_config
from adclr.kernels.dino_loss import AUTO_BACKEND, LOSS_BACKENDS
from adclr.schedules import StepSettings
from bench.report import Report

VARIANTS = ("dino", "dino_fused", "triton", "triton_fused", "sdpa", "reference")
# Fixed scheduled values: the step's cost does not depend on them.
SETTINGS = StepSettings(lr=1e-4, weight_decay=0.04, teacher_temp=0.04, momentum=0.996, freeze_last_layer=False)


def variant_config(tiny: bool, num_query: int, backend: str, fused_loss: bool, device: torch.device) -> TrainConfig:
    """The paper's ViT-S/16 recipe (batch 64, 2x224 + 10x96 crops), or with ``tiny`` the built-in preset
    made even smaller, with attention ``backend``, ``num_query`` query crops and the fused or unfused loss."""
    common = dict(attn_backend=backend, num_query=num_query, fused_loss=fused_loss)
    if tiny:
        return make_config(
            "builtin", **common, batch_size_per_gpu=4, local_crops_number=2, out_dim=64, precision="fp32"
        )
    return make_config("paper", **common, precision=train_step.default_precision(device))


def time_variant(variant: str, tiny: bool, steps: int, device: torch.device, loss_backend: str = "auto") -> dict:
    backend, _, fused = variant.partition("_")
    num_query = 0 if backend == "dino" else (4 if tiny else 10)
    config = variant_config(tiny, num_query, "auto" if backend == "dino" else backend, bool(fused), device)
    state = train_step.build_train_state(config, device)
    if fused:
        state.loss.backend = loss_backend
    B, p = config.optim.batch_size_per_gpu, config.patch_size
    data = config.data
    torch.manual_seed(0)
    crops = [torch.randn(B, 3, data.global_size, data.global_size, device=device) for _ in range(2)]
    crops += [
        torch.randn(B, 3, data.local_size, data.local_size, device=device) for _ in range(data.local_crops_number)
    ]
    query_crops = torch.randn(B, num_query, 3, p, p, device=device) if num_query else None

    def step():
        train_step.training_step(state, crops, query_crops, SETTINGS)

    warmup = 2 if tiny else 5
    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            tic = time.perf_counter()
            step()
            times.append((time.perf_counter() - tic) * 1e3)
    ms = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return dict(
        variant=variant,
        arch=f"{config.arch}/{p}",
        batch=B,
        crops=f"2x{data.global_size}+{data.local_crops_number}x{data.local_size}",
        Q=num_query,
        fused_loss=bool(fused),
        precision=config.optim.precision,
        step_ms=ms,
        images_per_s=B / (ms * 1e-3),
        peak_mib=peak,
    )


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny model and batch (CPU smoke test)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--loss_backend", choices=LOSS_BACKENDS, default="auto", help="row operations of the *_fused variants"
    )
    parser.add_argument("--output_dir", help="default: bench/results/<date>_<device>/")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report = Report("train_step", args.output_dir, device)
    report.note(f"fused loss row operations: backend={args.loss_backend!r} (auto: {AUTO_BACKEND})")
    dino = None
    for variant in args.variants:  # the table is rewritten after every variant: a cut-short run keeps it
        row = time_variant(variant, args.tiny, args.steps, device, args.loss_backend)
        dino = row if variant == "dino" else dino
        row["time_vs_dino"] = row["step_ms"] / dino["step_ms"] if dino else float("nan")
        row["memory_vs_dino"] = row["peak_mib"] / dino["peak_mib"] if dino else float("nan")
        report.add(row)
        report.write()
    return report.output_dir


if __name__ == "__main__":
    print(f"results in {main()}")
