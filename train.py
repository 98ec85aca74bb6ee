"""ADCLR pretraining (Zhang et al., ICLR 2023): DINO plus query crops under unidirectional attention.

    python train.py                                   # small ViT on the built-in shapes data (CPU ok)
    torchrun --nproc_per_node 8 train.py --data_path /imagenet/train --output_dir runs/vits16

``--preset`` sets the size-related flags (table below): ``builtin`` trains in minutes on a laptop CPU,
``paper`` is the paper's ViT-S/16 recipe; the default is ``builtin`` without ``--data_path`` and
``paper`` with it, and any flag you pass wins over its preset value. Every other default is the
paper's. A restart with the same ``--output_dir`` resumes from ``checkpoint.pth``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from adclr import engine
from adclr.augment import MultiCropAugmentation, MultiCropConfig
from adclr.checkpoint import CheckpointError, load_checkpoint, restore, save_checkpoint
from adclr.config import PRESETS, TrainConfig, field_default, make_config, preset_table
from adclr.data import ImageFiles, SyntheticShapes, collate_multicrop
from adclr.evaluate import EvalConfig, check_eval_folders, evaluate_backbone
from adclr.kernels import BACKENDS, QUERY_KEY_RULES
from adclr.model import ARCHS
from adclr.training import init_distributed, seed_everything


def get_args_parser() -> argparse.ArgumentParser:
    """The command line. Flags left out are absent from the parsed namespace (the config fills them)."""
    p = argparse.ArgumentParser(
        "ADCLR",
        description=__doc__,
        epilog="values of --preset (a flag you pass overrides its preset value):\n" + preset_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )

    def flag(name: str, help: str = "", default_text: str | None = None, **kwargs) -> None:
        """A config field's flag; its help ends with the default, or says that --preset sets it."""
        if default_text is None:
            default = field_default(name)
            default = " ".join(map(str, default)) if isinstance(default, tuple) else default
            default_text = "set by --preset" if name in PRESETS["paper"] else f"default: {default}"
        p.add_argument(f"--{name}", help=f"{help} ({default_text})".lstrip(), **kwargs)

    p.add_argument(
        "--preset", choices=tuple(PRESETS), help="size-related defaults (default: builtin, or paper with --data_path)"
    )
    # Model
    flag("arch", "ViT size", choices=sorted(ARCHS))
    flag("patch_size", "patch size in pixels", type=int)
    flag("out_dim", "head output dimension K", type=int)
    flag("head_hidden_dim", "head MLP width", type=int)
    flag("head_bottleneck_dim", "head bottleneck width", type=int)
    flag("norm_last_layer", "freeze the weight norm of the head's last layer", type=_bool)
    flag("separate_query_head", "query tokens get their own head", action="store_true")
    flag("drop_path_rate", "stochastic depth of the student", type=float)
    flag("attn_backend", "attention implementation", choices=BACKENDS)
    # ADCLR
    flag("num_query", "query crops per image Q", type=int)
    flag("query_scale", "area range of query crops", type=float, nargs=2)
    flag("lambda_query", "weight of the query loss (lambda)", type=float)
    flag("query_keys", "keys a query token sees", choices=QUERY_KEY_RULES)
    flag("bidirectional", "full attention (the paper's collapsing ablation)", action="store_true")
    # Teacher and loss
    flag("momentum_teacher", "EMA momentum start, cosine to 1", type=float)
    flag("warmup_teacher_temp", "teacher temperature at the start of its warm-up", type=float)
    flag("teacher_temp", "teacher temperature after warm-up", type=float)
    flag("warmup_teacher_temp_epochs", "teacher temperature warm-up", type=int)
    flag(
        "fused_loss",
        "apply the heads' last layer inside the chunked loss, never materialising [tokens, K] logits; "
        "false: the unfused reference loss",
        type=_bool,
    )
    # Optimisation
    flag(
        "precision",
        "autocast dtype; fp32 runs without autocast",
        choices=("fp32", "bf16", "fp16"),
        default_text="default: bf16 on CUDA, fp32 on CPU",
    )
    flag("weight_decay", "weight decay at the start of its cosine schedule", type=float)
    flag("weight_decay_end", "final weight decay of the cosine schedule", type=float)
    flag("clip_grad", "per-parameter gradient norm clip (0: off)", type=float)
    flag("batch_size_per_gpu", "images per process", type=int)
    flag("epochs", type=int)
    flag("freeze_last_layer", "epochs with the head's last layer frozen", type=int)
    flag("lr", "peak learning rate at batch 256 (linearly scaled)", type=float)
    flag("warmup_epochs", "linear learning-rate warm-up", type=int)
    flag("min_lr", "final learning rate of the cosine schedule", type=float)
    # Augmentation
    flag("global_size", "global crop size", type=int)
    flag("local_size", "local crop size", type=int)
    flag("global_crops_scale", "area range of global crops", type=float, nargs=2)
    flag("local_crops_number", "local crops per image", type=int)
    flag("local_crops_scale", "area range of local crops", type=float, nargs=2)
    # Data, evaluation, output
    flag(
        "data_path",
        "ImageFolder tree or flat folder of images",
        default_text="default: the built-in shapes; switches the default preset to paper",
    )
    flag("builtin_train_size", "images in the built-in training split", type=int)
    flag("builtin_test_size", "images in the built-in test split", type=int)
    flag("eval_every", "k-NN evaluation every N epochs (0: only at the end)", type=int)
    flag(
        "eval_data_path",
        "folder with train/ and val/ ImageFolder trees for the periodic and final k-NN",
        default_text="default: the built-in shapes, with their dense segmentation probe",
    )
    flag("output_dir")
    flag("saveckp_freq", "also keep checkpoint{epoch}.pth every N epochs", type=int)
    flag("seed", type=int)
    flag("num_workers", type=int)
    flag("tensorboard", "also log to TensorBoard (needs tensorboard)", action="store_true")
    return p


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def main(argv: list[str] | None = None) -> None:
    flags = vars(get_args_parser().parse_args(argv))  # only the flags given on the command line
    preset = flags.pop("preset", None)
    cfg = make_config(preset, **flags)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg.optim.precision = cfg.optim.precision or engine.default_precision(device)
    dist_info = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    main_process = dist_info.is_main
    if cfg.run.eval_data_path:
        try:
            check_eval_folders(cfg.run.eval_data_path)
        except ValueError as error:
            raise SystemExit(f"--eval_data_path: {error}") from None
    os.makedirs(cfg.run.output_dir, exist_ok=True)
    checkpoint_path = os.path.join(cfg.run.output_dir, "checkpoint.pth")
    log = (lambda *a: print(*a, flush=True)) if main_process else (lambda *a: None)
    log(describe_preset(cfg, flags, chosen=preset is not None))
    log("config: " + json.dumps(cfg.to_dict()))

    # ---- data: multi-crop views + query crops of every image -------------------------------------
    data = cfg.data
    augmentation = MultiCropAugmentation(
        MultiCropConfig(
            global_size=data.global_size,
            local_size=data.local_size,
            global_crops_scale=data.global_crops_scale,
            local_crops_scale=data.local_crops_scale,
            local_crops_number=data.local_crops_number,
            num_query=data.num_query,
            query_scale=data.query_scale,
            patch_size=cfg.model.patch_size,
        )
    )
    if data.data_path:
        dataset = ImageFiles(data.data_path, transform=augmentation)
    else:
        dataset = SyntheticShapes(data.builtin_train_size, data.global_size, "train", cfg.run.seed, augmentation)
    sampler = DistributedSampler(
        dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=cfg.run.seed, drop_last=True
    )
    batch_size = cfg.optim.batch_size_per_gpu
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=data.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        collate_fn=collate_multicrop,
    )
    iters_per_epoch = len(loader)
    if iters_per_epoch == 0:
        raise SystemExit(f"{len(dataset)} images are fewer than one batch of {batch_size} per process")

    # ---- student, teacher (EMA of the student), loss, optimizer; per-iteration schedules -----------
    state = engine.build_train_state(cfg, device, distributed=dist_info.enabled)
    schedules = engine.build_schedules(cfg, iters_per_epoch, dist_info.world_size)

    # ---- resume ------------------------------------------------------------------------------------
    start_epoch, history = 0, []
    if os.path.exists(checkpoint_path):
        try:
            saved = load_checkpoint(checkpoint_path)
            restore(saved, state)
        except CheckpointError as error:
            raise SystemExit(f"cannot resume: {error}. Move it away or choose another --output_dir.") from None
        start_epoch, history = saved.epoch, saved.history
        now = cfg.flat()
        changed = {name: (value, now[name]) for name, value in saved.config.flat().items() if value != now[name]}
        log(
            f"resumed from {checkpoint_path} at epoch {start_epoch}"
            + (f"; changed since: {changed}" if changed else "")
        )

    writer = None
    if cfg.run.tensorboard and main_process:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional `tensorboard` package

        writer = SummaryWriter(os.path.join(cfg.run.output_dir, "tensorboard"))

    # ---- training ------------------------------------------------------------------------------------
    epochs, total_batch = cfg.optim.epochs, batch_size * dist_info.world_size
    evaluation: dict = {}
    baseline: dict = {}  # the random-init metrics: computed once, at the first evaluation
    for epoch in range(start_epoch, epochs):
        seed_everything(cfg.run.seed + 1000 * epoch + dist_info.rank)  # augmentations, drop-path: resumable
        sampler.set_epoch(epoch)
        state.student.train()
        sums = {"loss": 0.0, "cls": 0.0, "query": 0.0}
        progress = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not main_process, dynamic_ncols=True)
        tic = time.perf_counter()
        for it, (crops, query_crops, _) in enumerate(progress):
            settings = schedules.at(epoch * iters_per_epoch + it)
            crops = [c.to(device, non_blocking=True) for c in crops]
            # Without a query loss (Q = 0 or lambda = 0) the query tokens would be computed for nothing.
            use_queries = data.num_query > 0 and cfg.loss.lambda_query != 0
            query_crops = query_crops.to(device, non_blocking=True) if use_queries else None
            try:
                losses = engine.training_step(state, crops, query_crops, settings)
            except engine.NonFiniteLossError as error:
                kept = (
                    f"the last good checkpoint is {checkpoint_path}"
                    if os.path.exists(checkpoint_path)
                    else "no checkpoint was written yet"
                )
                raise SystemExit(f"{error} at epoch {epoch + 1}, iteration {it}; stopping training ({kept}).") from None

            values = dataclasses.asdict(losses)
            for name, value in values.items():
                sums[name] += value
            images_per_s = total_batch * (it + 1) / (time.perf_counter() - tic)
            postfix = {name: f"{value:.3f}" for name, value in values.items()}
            postfix.update(lr=f"{settings.lr:.2e}", img_s=f"{images_per_s:.0f}")
            if device.type == "cuda":
                postfix["mem"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}G"
            progress.set_postfix(postfix)

        record = {
            "epoch": epoch + 1,
            **{k: v / iters_per_epoch for k, v in sums.items()},
            "lr": settings.lr,
            "weight_decay": settings.weight_decay,
            "teacher_temp": settings.teacher_temp,
            "images_per_s": images_per_s,
        }
        last_epoch = epoch + 1 == epochs
        if main_process and (last_epoch or (cfg.run.eval_every and (epoch + 1) % cfg.run.eval_every == 0)):
            baseline = baseline or evaluate(cfg, engine.random_init_backbone(cfg).to(device), device, "random_init")
            evaluation = {**evaluate(cfg, state.teacher.backbone, device, "teacher"), **baseline}
            record.update(evaluation)
            log("evaluation: " + json.dumps(evaluation))
        history.append(record)

        if main_process:
            save_checkpoint(checkpoint_path, state, cfg, epoch + 1, history)
            if cfg.run.saveckp_freq and (epoch + 1) % cfg.run.saveckp_freq == 0:
                save_checkpoint(
                    os.path.join(cfg.run.output_dir, f"checkpoint{epoch + 1:04d}.pth"), state, cfg, epoch + 1, history
                )
            with open(os.path.join(cfg.run.output_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            if writer:
                for key, value in record.items():
                    writer.add_scalar(key, value, epoch + 1)
        if dist_info.enabled:
            torch.distributed.barrier()

    if main_process and evaluation:
        log(summary(cfg, evaluation))
    if dist_info.enabled:
        torch.distributed.destroy_process_group()


def describe_preset(cfg: TrainConfig, flags: dict, chosen: bool) -> str:
    """One line: the preset (and why), every value it sets, and those that command-line ``flags`` overrode."""
    values = PRESETS[cfg.preset]
    why = "--preset" if chosen else ("--data_path given" if cfg.data.data_path else "no --data_path")
    line = f"preset {cfg.preset} ({why}): " + ", ".join(f"{name}={value}" for name, value in values.items())
    overridden = {name: flags[name] for name in values if name in flags}
    if overridden:
        line += "; overridden by flags: " + ", ".join(f"{name}={value}" for name, value in overridden.items())
    return line


def evaluate(cfg: TrainConfig, backbone, device, name: str) -> dict:
    """Weighted k-NN on CLS features (``--eval_data_path``, else the built-in shapes, which add the linear
    segmentation probe on patch features); keys carry ``name`` (teacher or random_init)."""
    eval_data_path = cfg.run.eval_data_path
    config = EvalConfig(
        data_path=eval_data_path,
        image_size=cfg.data.global_size,
        resize_size=None if eval_data_path else cfg.data.global_size,  # DINO's 256/224 resize on real images
        builtin_train_size=cfg.data.builtin_train_size,
        builtin_val_size=cfg.data.builtin_test_size,
        seed=cfg.run.seed,
    )
    return {f"{key}_{name}": value for key, value in evaluate_backbone(backbone, config, device).items()}


def summary(cfg: TrainConfig, evaluation: dict) -> str:
    """One line: the teacher's metrics next to the same architecture at random initialisation."""
    where = cfg.run.eval_data_path or "the built-in shapes"
    chance = "" if cfg.run.eval_data_path else f", chance: {100 / SyntheticShapes.num_classes:.1f}%"
    line = (
        f"k-NN top-1 on {where}: {evaluation['knn_top1_teacher']:.1f}% "
        f"(random init: {evaluation['knn_top1_random_init']:.1f}%{chance})"
    )
    if "dense_miou_teacher" in evaluation:
        line += (
            f"; dense linear-probe mIoU: {evaluation['dense_miou_teacher']:.1f}% "
            f"(random init: {evaluation['dense_miou_random_init']:.1f}%)"
        )
    return line


if __name__ == "__main__":
    main()
