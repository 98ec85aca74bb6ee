"""End-to-end: one full multi-crop ADCLR training step per attention backend, against DINO.

    python -m bench.train_step                        # ViT-S/16, batch 64, 2x224 + 10x96 crops, Q = 10, bf16 (GPU)
    python -m bench.train_step --device cpu --tiny    # smoke test of the harness
    python -m bench.train_step --variants dino triton_fused --loss_backend torch   # the fused loss's PyTorch rows

Every variant runs ``train.training_step`` (the trainer's own iteration: teacher and student
forward, ADCLR loss, backward, clipping, AdamW, EMA) on the same model and the same random crops.
"DINO" is the same model and loss with no query tokens. ``*_fused`` variants apply the heads' last
layer inside the chunked fused loss (``--fused_loss true``); the others use the unfused reference
loss. Reports the median step time (CUDA events around each step, after warm-up), images/s, peak
memory and each variant's ratio to the unfused DINO step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import train
from adclr.fused_loss import FusedADCLRLoss
from adclr.kernels.dino_loss import AUTO_BACKEND, LOSS_BACKENDS
from adclr.loss import ADCLRLoss
from adclr.training import param_groups
from bench.report import Report

VARIANTS = ("dino", "dino_fused", "triton", "triton_fused", "sdpa", "reference")


def make_args(tiny: bool, num_query: int, backend: str, device: torch.device) -> argparse.Namespace:
    flags = ["--attn_backend", backend, "--num_query", str(num_query)]
    if tiny:  # the built-in preset, even smaller
        flags += ["--batch_size_per_gpu", "4", "--local_crops_number", "2", "--out_dim", "64", "--precision", "fp32"]
    else:  # the paper's ViT-S/16 recipe
        flags += ["--data_path", "unused", "--local_crops_number", "10", "--batch_size_per_gpu", "64"]
    return train.resolve_defaults(train.get_args_parser().parse_args(flags), device)


def time_variant(variant: str, tiny: bool, steps: int, device: torch.device, loss_backend: str = "auto") -> dict:
    backend, _, fused = variant.partition("_")
    num_query = 0 if backend == "dino" else (4 if tiny else 10)
    args = make_args(tiny, num_query, "auto" if backend == "dino" else backend, device)
    torch.manual_seed(0)
    student = train.build_network(args, args.drop_path_rate).to(device)
    teacher = train.build_network(args, 0.0).to(device).requires_grad_(False)
    teacher.load_state_dict(student.state_dict())
    loss_fn = ADCLRLoss(args.out_dim, 2 + args.local_crops_number, lambda_query=args.lambda_query)
    if fused:
        loss_fn = FusedADCLRLoss(
            args.out_dim, 2 + args.local_crops_number, lambda_query=args.lambda_query, backend=loss_backend
        )
    loss_fn = loss_fn.to(device)
    optimizer = torch.optim.AdamW(param_groups(student), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    B, p = args.batch_size_per_gpu, args.patch_size
    crops = [torch.randn(B, 3, args.global_size, args.global_size, device=device) for _ in range(2)]
    crops += [
        torch.randn(B, 3, args.local_size, args.local_size, device=device) for _ in range(args.local_crops_number)
    ]
    query_crops = torch.randn(B, num_query, 3, p, p, device=device) if num_query else None

    def step():
        train.training_step(
            student,
            student,
            teacher,
            loss_fn,
            optimizer,
            scaler,
            crops,
            query_crops,
            teacher_temp=0.04,
            momentum=0.996,
            clip_grad=args.clip_grad,
            freeze_last_layer=False,
            autocast_dtype=autocast_dtype,
        )

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
        arch=f"{args.arch}/{p}",
        batch=B,
        crops=f"2x{args.global_size}+{args.local_crops_number}x{args.local_size}",
        Q=num_query,
        fused_loss=bool(fused),
        precision=args.precision,
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
    rows = [time_variant(v, args.tiny, args.steps, device, args.loss_backend) for v in args.variants]
    report.note(f"fused loss row operations: backend={args.loss_backend!r} (auto: {AUTO_BACKEND})")
    dino = next((r for r in rows if r["variant"] == "dino"), None)
    for row in rows:
        row["time_vs_dino"] = row["step_ms"] / dino["step_ms"] if dino else float("nan")
        row["memory_vs_dino"] = row["peak_mib"] / dino["peak_mib"] if dino else float("nan")
        report.add(row)
    return report.write()


if __name__ == "__main__":
    print(f"results in {main()}")
