"""ADCLR pretraining (Zhang et al., ICLR 2023): DINO plus query crops under unidirectional attention.

    python train.py                                   # small ViT on the built-in shapes data (CPU ok)
    torchrun --nproc_per_node 8 train.py --data_path /imagenet/train --output_dir runs/vits16

Without ``--data_path`` the size-related flags default to a small preset that trains in minutes on a
laptop CPU; with it they default to the paper's ViT-S/16 recipe. Every other default is the paper's.
A restart with the same ``--output_dir`` resumes from ``checkpoint.pth``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from adclr.augment import MultiCropAugmentation, MultiCropConfig
from adclr.data import ImageFiles, SyntheticShapes, collate_multicrop
from adclr.evaluate import EvalConfig, evaluate_backbone
from adclr.heads import DINOHead
from adclr.kernels import BACKENDS, QUERY_KEY_RULES
from adclr.loss import ADCLRLoss, LossTerms
from adclr.model import ARCHS, MultiCropWrapper, build_vit
from adclr.training import (
    cancel_last_layer_gradients,
    clip_gradients_per_parameter,
    cosine_schedule,
    ema_update,
    finite_or_stop,
    init_distributed,
    param_groups,
    save_atomic,
    seed_everything,
    teacher_temp_schedule,
)

# Size-related defaults: the paper's recipe on real data, a CPU-sized one on the built-in data.
# The built-in preset is sized for 800 iterations on a CPU. Its head is narrow (a 32-d bottleneck, 256
# outputs) and its teacher temperature constant at 0.04 (DINO's ViT-S default): with wider heads the
# teacher's targets start nearly uniform and DINO needs far more iterations than a CPU run has to
# escape that (measured: no k-NN gain after 600 iterations). Learning rate and weight decay stay
# nearly flat, since a cosine to 1e-6 / 0.4 spends half of so short a run barely learning.
PAPER = dict(
    arch="vit_small",
    patch_size=16,
    out_dim=65536,
    epochs=100,
    batch_size_per_gpu=64,
    global_size=224,
    local_size=96,
    local_crops_number=10,
    num_query=10,
    warmup_epochs=10,
    warmup_teacher_temp_epochs=30,
    teacher_temp=0.07,
    drop_path_rate=0.1,
    lr=0.0005,
    min_lr=1e-6,
    weight_decay_end=0.4,
    head_hidden_dim=2048,
    head_bottleneck_dim=256,
    momentum_teacher=0.996,
)
BUILTIN = dict(
    arch="vit_pico",
    patch_size=8,
    out_dim=256,
    epochs=16,
    batch_size_per_gpu=32,
    global_size=32,
    local_size=16,
    local_crops_number=2,
    num_query=6,
    warmup_epochs=1,
    warmup_teacher_temp_epochs=0,
    teacher_temp=0.04,
    drop_path_rate=0.0,
    lr=0.004,
    min_lr=2.5e-4,
    weight_decay_end=0.04,
    head_hidden_dim=512,
    head_bottleneck_dim=32,
    momentum_teacher=0.996,
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("ADCLR", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = "(default: paper's with --data_path, small preset without)"
    # Model
    p.add_argument("--arch", choices=sorted(ARCHS), help=f"ViT size {preset}")
    p.add_argument("--patch_size", type=int, help=f"patch size in pixels {preset}")
    p.add_argument("--out_dim", type=int, help=f"head output dimension K {preset}")
    p.add_argument("--head_hidden_dim", type=int, help=f"head MLP width {preset}")
    p.add_argument("--head_bottleneck_dim", type=int, help=f"head bottleneck width {preset}")
    p.add_argument(
        "--norm_last_layer", type=_bool, default=True, help="freeze the weight norm of the head's last layer"
    )
    p.add_argument("--separate_query_head", action="store_true", help="query tokens get their own head")
    p.add_argument("--drop_path_rate", type=float, help=f"stochastic depth of the student {preset}")
    p.add_argument("--attn_backend", choices=BACKENDS, default="auto", help="attention implementation")
    # ADCLR
    p.add_argument("--num_query", type=int, help=f"query crops per image Q {preset}")
    p.add_argument("--query_scale", type=float, nargs=2, default=(0.05, 0.15), help="area range of query crops")
    p.add_argument("--lambda_query", type=float, default=0.5, help="weight of the query loss (lambda)")
    p.add_argument("--query_keys", choices=QUERY_KEY_RULES, default="prefix+raw", help="keys a query token sees")
    p.add_argument("--bidirectional", action="store_true", help="full attention (the paper's collapsing ablation)")
    # Teacher and loss
    p.add_argument("--momentum_teacher", type=float, help=f"EMA momentum start, cosine to 1 {preset}")
    p.add_argument("--warmup_teacher_temp", type=float, default=0.04)
    p.add_argument("--teacher_temp", type=float, help=f"teacher temperature after warm-up {preset}")
    p.add_argument("--warmup_teacher_temp_epochs", type=int, help=f"teacher temperature warm-up {preset}")
    # Optimisation
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        help="autocast dtype; fp32 runs without autocast (default: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument("--weight_decay", type=float, default=0.04)
    p.add_argument("--weight_decay_end", type=float, help=f"final weight decay of the cosine schedule {preset}")
    p.add_argument("--clip_grad", type=float, default=3.0, help="per-parameter gradient norm clip (0: off)")
    p.add_argument("--batch_size_per_gpu", type=int, help=f"images per process {preset}")
    p.add_argument("--epochs", type=int, help=f"{preset}")
    p.add_argument("--freeze_last_layer", type=int, default=1, help="epochs with the head's last layer frozen")
    p.add_argument("--lr", type=float, help=f"peak learning rate at batch 256 (linearly scaled) {preset}")
    p.add_argument("--warmup_epochs", type=int, help=f"linear learning-rate warm-up {preset}")
    p.add_argument("--min_lr", type=float, help=f"final learning rate of the cosine schedule {preset}")
    # Augmentation
    p.add_argument("--global_size", type=int, help=f"global crop size {preset}")
    p.add_argument("--local_size", type=int, help=f"local crop size {preset}")
    p.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.4, 1.0))
    p.add_argument("--local_crops_number", type=int, help=f"{preset}")
    p.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.4))
    # Data, evaluation, output
    p.add_argument("--data_path", help="ImageFolder tree or flat folder of images (default: built-in shapes)")
    p.add_argument("--builtin_train_size", type=int, default=1600, help="images in the built-in training split")
    p.add_argument("--builtin_test_size", type=int, default=600, help="images in the built-in test split")
    p.add_argument("--eval_every", type=int, default=0, help="k-NN evaluation every N epochs (0: only at the end)")
    p.add_argument("--output_dir", default="runs/adclr")
    p.add_argument("--saveckp_freq", type=int, default=20, help="also keep checkpoint{epoch}.pth every N epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (needs tensorboard)")
    return p


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def resolve_defaults(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill the unset size-related flags from the paper's preset (real data) or the built-in one."""
    for name, value in (PAPER if args.data_path else BUILTIN).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.precision is None:  # CPUs without bf16 matrix units run autocast slower than fp32
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    return args


@dataclass
class RunResult:
    """What a finished run leaves behind (``main`` returns it; tests read it)."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    history: list = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)


def main(args: argparse.Namespace) -> RunResult:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = resolve_defaults(args, device)
    dist_info = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    main_process = dist_info.is_main
    os.makedirs(args.output_dir, exist_ok=True)
    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")
    log = (lambda *a: print(*a, flush=True)) if main_process else (lambda *a: None)
    log("config: " + json.dumps(vars(args), sort_keys=True))
    seed_everything(args.seed + dist_info.rank)

    # ---- data: multi-crop views + query crops of every image -------------------------------------
    augmentation = MultiCropAugmentation(
        MultiCropConfig(
            global_size=args.global_size,
            local_size=args.local_size,
            global_crops_scale=tuple(args.global_crops_scale),
            local_crops_scale=tuple(args.local_crops_scale),
            local_crops_number=args.local_crops_number,
            num_query=args.num_query,
            query_scale=tuple(args.query_scale),
            patch_size=args.patch_size,
        )
    )
    if args.data_path:
        dataset = ImageFiles(args.data_path, transform=augmentation)
    else:
        dataset = SyntheticShapes(args.builtin_train_size, args.global_size, "train", args.seed, transform=augmentation)
    sampler = DistributedSampler(
        dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=args.seed, drop_last=True
    )
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size_per_gpu,
        sampler=sampler,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        collate_fn=collate_multicrop,
    )
    iters_per_epoch = len(loader)
    if iters_per_epoch == 0:
        raise SystemExit(f"{len(dataset)} images are fewer than one batch of {args.batch_size_per_gpu} per process")

    # ---- student and teacher: same ViT + DINO head, teacher is an EMA of the student -------------
    student = build_network(args, args.drop_path_rate).to(device)
    teacher = build_network(args, 0.0).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    random_init = copy.deepcopy(teacher.backbone).cpu()  # the k-NN baseline: same architecture, no training
    student_ddp = (
        DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
        if dist_info.enabled
        else student
    )

    loss_fn = ADCLRLoss(args.out_dim, num_crops=2 + args.local_crops_number, lambda_query=args.lambda_query).to(device)
    optimizer = torch.optim.AdamW(param_groups(student))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    # ---- per-iteration schedules ------------------------------------------------------------------
    total_batch = args.batch_size_per_gpu * dist_info.world_size
    lr_schedule = cosine_schedule(
        args.lr * total_batch / 256, args.min_lr, args.epochs, iters_per_epoch, args.warmup_epochs
    )
    wd_schedule = cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch)
    momentum_schedule = cosine_schedule(args.momentum_teacher, 1.0, args.epochs, iters_per_epoch)
    temp_schedule = teacher_temp_schedule(
        args.warmup_teacher_temp, args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs, iters_per_epoch
    )

    # ---- resume ------------------------------------------------------------------------------------
    start_epoch, history = 0, []
    if os.path.exists(checkpoint_path):
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        random_init.load_state_dict(state["random_init"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        loss_fn.load_state_dict(state["loss"])
        start_epoch, history = state["epoch"], state["history"]
        log(f"resumed from {checkpoint_path} at epoch {start_epoch}")

    writer = None
    if args.tensorboard and main_process:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional `tensorboard` package

        writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"))

    # ---- training ------------------------------------------------------------------------------------
    evaluation: dict = {}
    baseline: dict = {}  # the random-init metrics: computed once, at the first evaluation
    for epoch in range(start_epoch, args.epochs):
        seed_everything(args.seed + 1000 * epoch + dist_info.rank)  # augmentations, drop-path: resumable
        sampler.set_epoch(epoch)
        student.train()
        sums = {"loss": 0.0, "cls": 0.0, "query": 0.0}
        progress = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not main_process, dynamic_ncols=True)
        tic = time.perf_counter()
        for it, (crops, query_crops, _) in enumerate(progress):
            step = epoch * iters_per_epoch + it
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule[step]
                if not group.get("fixed_weight_decay"):
                    group["weight_decay"] = wd_schedule[step]
            crops = [c.to(device, non_blocking=True) for c in crops]
            query_crops = query_crops.to(device, non_blocking=True) if args.num_query > 0 else None

            terms = training_step(
                student,
                student_ddp,
                teacher,
                loss_fn,
                optimizer,
                scaler,
                crops,
                query_crops,
                teacher_temp=temp_schedule[step],
                momentum=momentum_schedule[step],
                clip_grad=args.clip_grad,
                freeze_last_layer=epoch < args.freeze_last_layer,
                autocast_dtype=autocast_dtype,
            )
            values = {"loss": terms.total.item(), "cls": terms.cls.item(), "query": terms.query.item()}
            finite_or_stop(values["loss"], f"epoch {epoch + 1}, iteration {it}", checkpoint_path)

            for name, value in values.items():
                sums[name] += value
            images_per_s = total_batch * (it + 1) / (time.perf_counter() - tic)
            postfix = {name: f"{value:.3f}" for name, value in values.items()}
            postfix.update(lr=f"{lr_schedule[step]:.2e}", img_s=f"{images_per_s:.0f}")
            if device.type == "cuda":
                postfix["mem"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}G"
            progress.set_postfix(postfix)

        record = {
            "epoch": epoch + 1,
            **{k: v / iters_per_epoch for k, v in sums.items()},
            "lr": float(lr_schedule[step]),
            "weight_decay": float(wd_schedule[step]),
            "teacher_temp": float(temp_schedule[step]),
            "images_per_s": images_per_s,
        }
        last_epoch = epoch + 1 == args.epochs
        if main_process and (last_epoch or (args.eval_every and (epoch + 1) % args.eval_every == 0)):
            baseline = baseline or evaluate(args, random_init.to(device), device, "random_init")
            random_init.cpu()
            evaluation = {**evaluate(args, teacher.backbone, device, "teacher"), **baseline}
            record.update(evaluation)
            log("evaluation: " + json.dumps(evaluation))
        history.append(record)

        if main_process:
            state = {
                "student": student.state_dict(),
                "teacher": teacher.state_dict(),
                "random_init": random_init.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "loss": loss_fn.state_dict(),
                "epoch": epoch + 1,
                "history": history,
                "args": vars(args),
            }
            save_atomic(state, checkpoint_path)
            if args.saveckp_freq and (epoch + 1) % args.saveckp_freq == 0:
                save_atomic(state, os.path.join(args.output_dir, f"checkpoint{epoch + 1:04d}.pth"))
            with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            if writer:
                for key, value in record.items():
                    writer.add_scalar(key, value, epoch + 1)
        if dist_info.enabled:
            torch.distributed.barrier()

    if main_process and evaluation:
        log(summary(evaluation))
    if dist_info.enabled:
        torch.distributed.destroy_process_group()
    return RunResult(student, teacher, history, evaluation)


def build_network(args: argparse.Namespace, drop_path_rate: float) -> MultiCropWrapper:
    """The ADCLR ViT with its DINO head (and a query head if asked), as the student or the teacher."""
    backbone = build_vit(
        args.arch,
        args.patch_size,
        args.global_size,
        drop_path_rate=drop_path_rate,
        query_keys=args.query_keys,
        bidirectional=args.bidirectional,
        attn_backend=args.attn_backend,
    )

    def head():
        return DINOHead(
            backbone.embed_dim,
            args.out_dim,
            args.head_hidden_dim,
            args.head_bottleneck_dim,
            norm_last_layer=args.norm_last_layer,
        )

    return MultiCropWrapper(backbone, head(), head() if args.separate_query_head else None)


def training_step(
    student,
    student_ddp,
    teacher,
    loss_fn,
    optimizer,
    scaler,
    crops,
    query_crops,
    *,
    teacher_temp: float,
    momentum: float,
    clip_grad: float,
    freeze_last_layer: bool,
    autocast_dtype,
) -> LossTerms:
    """One ADCLR iteration: teacher on the global crops, student on all, loss, update, EMA.

    A non-finite loss returns before any update, so the caller can stop with the model untouched.
    """
    device_type = crops[0].device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        with torch.no_grad():
            teacher_cls, teacher_query = teacher(crops[:2], query_crops)
        student_cls, student_query = student_ddp(crops, query_crops)
        terms = loss_fn(student_cls, teacher_cls, student_query, teacher_query, teacher_temp)
    if not math.isfinite(terms.total.item()):
        return terms
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms.total).backward()
    scaler.unscale_(optimizer)
    if clip_grad > 0:
        clip_gradients_per_parameter(student, clip_grad)
    if freeze_last_layer:
        cancel_last_layer_gradients(student)
    scaler.step(optimizer)
    scaler.update()
    ema_update(teacher, student, momentum)
    return terms


def evaluate(args, backbone, device, name: str) -> dict:
    """k-NN on CLS features and the linear segmentation probe on patch features, on the built-in labelled data."""
    config = EvalConfig(
        image_size=args.global_size,
        resize_size=args.global_size,
        builtin_train_size=args.builtin_train_size,
        builtin_val_size=args.builtin_test_size,
        seed=args.seed,
    )
    return {f"{key}_{name}": value for key, value in evaluate_backbone(backbone, config, device).items()}


def summary(evaluation: dict) -> str:
    return (
        f"k-NN top-1 on the built-in shapes: {evaluation['knn_top1_teacher']:.1f}% "
        f"(random init: {evaluation['knn_top1_random_init']:.1f}%, chance: {100 / SyntheticShapes.num_classes:.1f}%); "
        f"dense linear-probe mIoU: {evaluation['dense_miou_teacher']:.1f}% "
        f"(random init: {evaluation['dense_miou_random_init']:.1f}%)"
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
