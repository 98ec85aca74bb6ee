"""ADCLR pretraining (Zhang et al., ICLR 2023): DINO plus query crops under unidirectional attention.

    python train.py                                   # small ViT on the built-in scenes (CPU ok)
    torchrun --nproc_per_node 8 train.py --data_path /imagenet/train --output_dir runs/vits16

``--preset`` sets the size-related flags (table below): ``builtin`` trains in minutes on a laptop CPU,
``paper`` is the paper's ViT-S/16 recipe; the default is ``builtin`` without ``--data_path`` and
``paper`` with it, and any flag you pass wins over its preset value. Every other default is the
paper's. A restart with the same ``--output_dir`` resumes from ``checkpoint.pth`` (or, if that file is
corrupt, from the newest readable ``checkpointNNNN.pth``).

A mistake in a flag, a path, the data or a checkpoint ends the run with one line and exit status 2,
before anything is written; ``--debug`` (or ``ADCLR_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

# Only the standard library and torch-free project modules at the top: --help and a mistake in a flag or
# a path answer before torch loads (a minute on a loaded machine). train() imports the rest.
from adclr.choices import ARCHS, ATTN_BACKENDS, PRECISIONS, QUERY_KEY_RULES
from adclr.cli import (
    add_debug_flag,
    check_device,
    parse_bool,
    require_eval_folders,
    require_folder,
    require_package,
    require_writable_folder,
    user_errors,
)
from adclr.config import BOUNDS, PAIRS, PRESETS, TrainConfig, field_default, make_config, preset_table
from adclr.errors import ConfigError, UserError

# Each step the fp16 gradient scaler skips halves its scale: 30 in a row take it from 2**16 to 2**-14,
# past any overflow a sound run recovers from (a start-up typically skips a handful).
MAX_SKIPPED_STEPS = 30


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
        """A config field's flag: a numeric one parses with the field's ``BOUNDS`` (argparse refuses a value
        out of range with the flag's name and the range); its help ends with the range and the default."""
        if default_text is None:
            default = field_default(name)
            default = " ".join(map(str, default)) if isinstance(default, tuple) else default
            default_text = "set by --preset" if name in PRESETS["paper"] else f"default: {default}"
        if name in BOUNDS:
            kwargs["type"] = BOUNDS[name].parse
            accepted = f"two numbers {BOUNDS[name].condition}, min <= max" if name in PAIRS else BOUNDS[name]
            default_text = f"{accepted}; {default_text}"
        p.add_argument(f"--{name}", help=f"{help} ({default_text})".lstrip(), **kwargs)

    p.add_argument(
        "--preset", choices=tuple(PRESETS), help="size-related defaults (default: builtin, or paper with --data_path)"
    )
    # Model
    flag("arch", "ViT size", choices=tuple(ARCHS))
    flag("patch_size", "patch size in pixels")
    flag("out_dim", "head output dimension K")
    flag("head_hidden_dim", "head MLP width")
    flag("head_bottleneck_dim", "head bottleneck width")
    flag("norm_last_layer", "freeze the weight norm of the head's last layer", type=parse_bool)
    flag("separate_query_head", "query tokens get their own head", action="store_true")
    flag("drop_path_rate", "stochastic depth of the student")
    flag("attn_backend", "attention implementation", choices=ATTN_BACKENDS)
    # ADCLR
    flag("num_query", "query crops per image Q")
    flag("query_scale", "area range of query crops", nargs=2)
    flag("lambda_query", "weight of the query loss (lambda)")
    flag("query_keys", "keys a query token sees", choices=QUERY_KEY_RULES)
    flag("bidirectional", "full attention (the paper's collapsing ablation)", action="store_true")
    # Teacher and loss
    flag("momentum_teacher", "EMA momentum start, cosine to 1")
    flag("warmup_teacher_temp", "teacher temperature at the start of its warm-up")
    flag("teacher_temp", "teacher temperature after warm-up")
    flag("warmup_teacher_temp_epochs", "teacher temperature warm-up")
    flag(
        "fused_loss",
        "apply the heads' last layer inside the chunked loss, never materialising [tokens, K] logits; "
        "false: the unfused reference loss",
        type=parse_bool,
    )
    # Optimisation
    flag(
        "precision",
        "autocast dtype; fp32 runs without autocast",
        choices=PRECISIONS,
        default_text="default: bf16 on CUDA, fp32 on CPU; fp16 needs CUDA",
    )
    flag("weight_decay", "weight decay at the start of its cosine schedule")
    flag("weight_decay_end", "final weight decay of the cosine schedule")
    flag("clip_grad", "per-parameter gradient norm clip (0: off)")
    flag("batch_size_per_gpu", "images per process")
    flag("epochs")
    flag("freeze_last_layer", "epochs with the head's last layer frozen")
    flag("lr", "peak learning rate at batch 256 (linearly scaled)")
    flag("warmup_epochs", "linear learning-rate warm-up")
    flag("min_lr", "final learning rate of the cosine schedule")
    # Augmentation
    flag("global_size", "global crop size")
    flag("local_size", "local crop size")
    flag("global_crops_scale", "area range of global crops", nargs=2)
    flag("local_crops_number", "local crops per image")
    flag("local_crops_scale", "area range of local crops", nargs=2)
    # Data, evaluation, output
    flag(
        "data_path",
        "ImageFolder tree or flat folder of images",
        default_text="default: the built-in scenes; switches the default preset to paper",
    )
    flag("builtin_train_size", "images in the built-in training split")
    flag("builtin_test_size", "images in the built-in test split")
    flag("eval_every", "evaluate (k-NN; built-in scenes: also the dense probe) every N epochs (0: at the end)")
    flag(
        "eval_data_path",
        "folder with train/ and val/ ImageFolder trees for the periodic and final k-NN",
        default_text="default: the built-in scenes, with their dense segmentation probe",
    )
    flag(
        "builtin_eval_split",
        "the built-in scenes' val split: test, or holdout (train scenes never trained on) to choose settings",
        choices=("test", "holdout"),
    )
    flag("output_dir")
    flag("saveckp_freq", "also keep checkpoint{epoch}.pth every N epochs")
    flag("seed")
    flag("num_workers")
    flag("tensorboard", "also log to TensorBoard (needs tensorboard)", action="store_true")
    add_debug_flag(p)
    return p


def main(argv: list[str] | None = None) -> None:
    """Parse and check the command line (without torch), then train; a user's mistake exits 2 in one line."""
    parser = get_args_parser()
    flags = vars(parser.parse_args(argv))  # only the flags given on the command line
    debug = flags.pop("debug", False)
    preset = flags.pop("preset", None)
    try:
        cfg = make_config(preset, **flags)
    except ConfigError as error:  # a value out of range given another one (sizes and the patch size)
        parser.error(f"argument --{error.field}: {error.message}")
    with user_errors(debug):
        if cfg.data.data_path:
            require_folder(cfg.data.data_path, "--data_path")
        if cfg.run.eval_data_path:
            require_eval_folders(cfg.run.eval_data_path, "--eval_data_path")
        if cfg.run.tensorboard:
            require_package("tensorboard", "--tensorboard")
        require_writable_folder(cfg.run.output_dir, "--output_dir")
        train(cfg, flags, chosen_preset=preset is not None)


def train(cfg: TrainConfig, flags: dict, chosen_preset: bool) -> None:
    """The run: device checks, data, networks, resume, then epochs of training, checkpoints and evaluation."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler
    from tqdm import tqdm

    from adclr import train_step
    from adclr.augment import MultiCropAugmentation, MultiCropConfig
    from adclr.checkpoint import LATEST, find_resumable, restore, save_checkpoint, set_aside
    from adclr.data import ImageFiles, SyntheticScenes, collate_multicrop
    from adclr.distributed import init_distributed
    from adclr.evaluation.during_training import evaluate_run, run_summary
    from adclr.files import atomic_write
    from adclr.kernels import interpreter_enabled
    from adclr.lock import hold_output_dir
    from adclr.loss import collapse_warnings
    from adclr.runtime import SeededItems, configure_threads, seed_everything
    from adclr.schedules import build_schedules

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg.optim.precision = cfg.optim.precision or train_step.default_precision(device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    notes = check_device(cfg, device.type, capability, interpreter_enabled())
    dist_info = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    main_process = dist_info.is_main
    checkpoint_path = os.path.join(cfg.run.output_dir, LATEST)
    log = (lambda *a: print(*a, flush=True)) if main_process else (lambda *a: None)
    log(describe_preset(cfg, flags, chosen_preset))
    log("config: " + json.dumps(cfg.to_dict()))
    for note in notes:
        log(f"note: {note}")
    log(configure_threads(cfg.data.num_workers))

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
        dataset = SyntheticScenes(data.builtin_train_size, data.global_size, "train", cfg.run.seed, augmentation)
        dataset.precompute()  # before the loader forks its workers: they share the scenes
    dataset = SeededItems(dataset, cfg.run.seed)  # each image's crops from (seed, epoch, index): any --num_workers
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
        source = f"--data_path {data.data_path}" if data.data_path else "the built-in set (--builtin_train_size)"
        processes = f" on each of {dist_info.world_size} processes" if dist_info.enabled else ""
        raise UserError(
            f"{source} has {len(dataset)} images, fewer than one batch of {batch_size} per process{processes}; "
            "lower --batch_size_per_gpu"
        )
    os.makedirs(cfg.run.output_dir, exist_ok=True)
    for note in hold_output_dir(cfg.run.output_dir) if main_process else []:  # one run per folder
        log(f"note: {note}")

    # ---- student, teacher (EMA of the student), loss, optimizer; per-iteration schedules -----------
    state = train_step.build_train_state(cfg, device, distributed=dist_info.enabled)
    schedules = build_schedules(cfg, iters_per_epoch, dist_info.world_size)

    # ---- resume ------------------------------------------------------------------------------------
    start_epoch, history = 0, []
    saved, corrupt = find_resumable(cfg.run.output_dir)
    if saved:
        restore(saved, state)  # a checkpoint that does not fit this run stops it before anything is renamed
        start_epoch, history = saved.epoch, saved.history
    if dist_info.enabled:
        torch.distributed.barrier()  # every process has read its checkpoint before a corrupt one is renamed
    if main_process:
        for path, reason in corrupt:
            log(f"warning: {reason}; moved it to {set_aside(path)}")
    if saved:
        now = cfg.flat()
        changed = {name: (value, now[name]) for name, value in saved.config.flat().items() if value != now[name]}
        log(f"resumed from {saved.path} at epoch {start_epoch}" + (f"; changed since: {changed}" if changed else ""))

    writer = None
    if cfg.run.tensorboard and main_process:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional `tensorboard` package

        writer = SummaryWriter(os.path.join(cfg.run.output_dir, "tensorboard"))

    epochs, total_batch = cfg.optim.epochs, batch_size * dist_info.world_size
    log_path = os.path.join(cfg.run.output_dir, "log.jsonl")
    evaluation: dict = {}
    baseline: dict = {}  # the random-init metrics: computed once, at the first evaluation

    def save_epoch(epoch: int) -> None:
        """``checkpoint.pth`` after ``epoch`` epochs (and ``checkpointNNNN.pth`` every ``saveckp_freq``)."""
        save_checkpoint(checkpoint_path, state, cfg, epoch, history)
        if cfg.run.saveckp_freq and epoch % cfg.run.saveckp_freq == 0:
            save_checkpoint(os.path.join(cfg.run.output_dir, f"checkpoint{epoch:04d}.pth"), state, cfg, epoch, history)

    def finish_epoch(record: dict) -> None:
        """After an epoch's checkpoint: its evaluation if one is due (every process extracts a shard of the
        images; the main one rewrites the checkpoints with the results), then ``log.jsonl`` rewritten from
        the history and TensorBoard. Every process calls it."""
        nonlocal evaluation, baseline
        epoch = record["epoch"]
        if epoch == epochs or (cfg.run.eval_every and epoch % cfg.run.eval_every == 0):
            if not baseline:  # the same architecture at its initialisation, evaluated once per run
                baseline = evaluate_run(
                    cfg, train_step.random_init_backbone(cfg).to(device), device, "random_init", dist_info
                )
            evaluation = {**evaluate_run(cfg, state.teacher.backbone, device, "teacher", dist_info), **baseline}
            record.update(evaluation)
            log("evaluation: " + json.dumps(evaluation))
            if main_process:
                save_epoch(epoch)
        if main_process:
            with atomic_write(log_path, "w") as f:  # one line per epoch of the history: none lost, none twice
                f.writelines(json.dumps(r) + "\n" for r in history)
            if writer:
                for key, value in record.items():
                    writer.add_scalar(key, value, epoch)

    def kept() -> str:
        exists = os.path.exists(checkpoint_path)
        return f"the last good checkpoint is {checkpoint_path}" if exists else "no checkpoint was written yet"

    # A run stopped after an epoch's checkpoint but before its end (during its evaluation, say), or resumed
    # from an older numbered checkpoint, finishes that epoch first: log.jsonl then matches the history.
    unfinished = main_process and history and _logged_epochs(log_path) != [r["epoch"] for r in history]
    if dist_info.enabled:  # the main process reads the log; every process takes part in the evaluation
        flag = torch.tensor([float(bool(unfinished))], device=device)
        torch.distributed.broadcast(flag, src=0)
        unfinished = bool(flag.item())
    if unfinished:
        finish_epoch(history[-1])
    if start_epoch >= epochs:
        log(f"{checkpoint_path} is at epoch {start_epoch}: nothing left to train for --epochs {epochs}")

    # ---- training ------------------------------------------------------------------------------------
    skipped_in_a_row = 0  # optimizer steps the fp16 gradient scaler skipped (non-finite gradients)
    for epoch in range(start_epoch, epochs):
        seed_everything(cfg.run.seed + 1000 * epoch + dist_info.rank)  # augmentations, drop-path: resumable
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        state.student.train()
        sums = {f.name: 0.0 for f in dataclasses.fields(train_step.StepLosses)}
        skipped = 0
        progress = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not main_process, dynamic_ncols=True)
        tic = time.perf_counter()
        for it, (crops, query_crops, _) in enumerate(progress):
            settings = schedules.at(epoch * iters_per_epoch + it)
            crops = [c.to(device, non_blocking=True) for c in crops]
            # Without a query loss (Q = 0 or lambda = 0) the query tokens would be computed for nothing.
            use_queries = data.num_query > 0 and cfg.loss.lambda_query != 0
            query_crops = query_crops.to(device, non_blocking=True) if use_queries else None
            scale = state.scaler.get_scale()  # 1.0 (and no GPU sync) unless fp16
            try:
                losses = train_step.training_step(state, crops, query_crops, settings)
            except train_step.NonFiniteLossError as error:
                raise SystemExit(
                    f"{error} at epoch {epoch + 1}, iteration {it}; stopping training ({kept()})."
                ) from None
            if state.scaler.get_scale() < scale:  # the scaler found non-finite gradients and skipped the update
                skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
                if skipped_in_a_row == MAX_SKIPPED_STEPS:
                    raise SystemExit(
                        f"the fp16 gradient scaler skipped the last {MAX_SKIPPED_STEPS} optimizer steps in a row "
                        f"(non-finite gradients every time; loss scale now {state.scaler.get_scale():.1e}) at epoch "
                        f"{epoch + 1}, iteration {it}; stopping training ({kept()}). Try --precision bf16 or fp32, "
                        "or a lower --lr."
                    )
            else:
                skipped_in_a_row = 0

            values = dataclasses.asdict(losses)
            for name, value in values.items():
                sums[name] += value
            images_per_s = total_batch * (it + 1) / (time.perf_counter() - tic)
            postfix = {name: f"{values[name]:.3f}" for name in ("loss", "cls", "query")}
            postfix.update(
                lr=f"{settings.lr:.2e}",
                img_s=f"{images_per_s:.0f}",
                **{
                    short: f"{evaluation[key]:.1f}"  # the last evaluation's results, to watch learning
                    for short, key in (("knn", "knn_top1_teacher"), ("miou", "dense_miou_teacher"))
                    if key in evaluation
                },
            )
            if device.type == "cuda":
                postfix["mem"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}G"
            progress.set_postfix(postfix)

        if dist_info.enabled:  # the epoch's mean losses over every process's images, not the main one's alone
            totals = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
            torch.distributed.all_reduce(totals)
            sums = dict(zip(sums, (totals / dist_info.world_size).tolist()))
        record = {
            "epoch": epoch + 1,
            **{k: v / iters_per_epoch for k, v in sums.items() if math.isfinite(v)},  # no query entropy without queries
            "lr": settings.lr,
            "weight_decay": settings.weight_decay,
            "teacher_temp": settings.teacher_temp,
            "images_per_s": images_per_s,
        }
        if state.scaler.is_enabled():
            record["skipped_steps"] = skipped
        history.append(record)
        for warning in collapse_warnings(record, cfg.model.out_dim):
            log(f"warning: epoch {epoch + 1}: {warning}")
        if main_process:
            save_epoch(epoch + 1)  # before any evaluation: a run stopped during it keeps this epoch
        finish_epoch(record)
        if dist_info.enabled:
            torch.distributed.barrier()

    if writer:
        writer.close()
    if evaluation:
        log(run_summary(cfg, evaluation))
    if dist_info.enabled:
        torch.distributed.destroy_process_group()


def _logged_epochs(log_path: str) -> list:
    """The epochs ``log.jsonl`` holds lines for, in order (None for a line that does not parse)."""
    if not os.path.exists(log_path):
        return []
    epochs = []
    with open(log_path) as f:
        for line in f:
            try:
                epochs.append(json.loads(line)["epoch"])
            except (ValueError, KeyError, TypeError):
                epochs.append(None)
    return epochs


def describe_preset(cfg: TrainConfig, flags: dict, chosen: bool) -> str:
    """One line: the preset (and why), every value it sets, and those that command-line ``flags`` overrode."""
    values = PRESETS[cfg.preset]
    why = "--preset" if chosen else ("--data_path given" if cfg.data.data_path else "no --data_path")
    line = f"preset {cfg.preset} ({why}): " + ", ".join(f"{name}={value}" for name, value in values.items())
    overridden = {name: flags[name] for name in values if name in flags}
    if overridden:
        line += "; overridden by flags: " + ", ".join(f"{name}={value}" for name, value in overridden.items())
    return line


if __name__ == "__main__":
    main()
