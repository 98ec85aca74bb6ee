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
from typing import Any

# Only the standard library and torch-free project modules at the top: --help and a mistake in a flag or
# a path answer before torch loads (a minute on a loaded machine). train() imports the rest.
from adclr.choices import ARCHS, ATTN_BACKENDS, LOSS_BACKENDS, PRECISIONS, QUERY_KEY_RULES
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
    flag(
        "loss_backend",
        "row operations of the fused loss (auto: Triton on CUDA, PyTorch elsewhere)",
        choices=LOSS_BACKENDS,
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
    """The run, step by step: set up, data, networks, resume, then per epoch train, save and evaluate."""
    from adclr.loss import collapse_warnings

    run = start_run(cfg, flags, chosen_preset)
    data = build_data(run)
    state, schedules = build_state(run, len(data.loader))
    start_epoch, history = resume(run, state)
    evaluator = Evaluator(run)
    # A run stopped after an epoch's checkpoint but before its end (during its evaluation, say), or resumed
    # from an older numbered checkpoint, finishes that epoch first: log.jsonl then matches the history.
    unfinished = run.main_process and history and _logged_epochs(run.log_path) != [r["epoch"] for r in history]
    if run.main_process_flag(unfinished):  # the main process reads the log; every process evaluates
        end_epoch(run, state, history, history[-1], evaluator)
    if start_epoch >= cfg.optim.epochs:
        run.log(
            f"{run.checkpoint_path} is at epoch {start_epoch}: nothing left to train for --epochs {cfg.optim.epochs}"
        )

    skipped = SkippedSteps(run)
    for epoch in range(start_epoch, cfg.optim.epochs):
        record = train_one_epoch(run, state, schedules, data, epoch, skipped, evaluator.latest)
        history.append(record)
        for warning in collapse_warnings(record, cfg.model.out_dim):
            run.log(f"warning: epoch {epoch + 1}: {warning}")
        if run.main_process:
            save(run, state, epoch + 1, history)  # before any evaluation: a run stopped during it keeps this epoch
        end_epoch(run, state, history, record, evaluator)
        run.barrier()
    run.finish(evaluator.latest)


@dataclasses.dataclass
class Run:
    """What every step of a run reads: its config, the device, this process's rank, the log and the files."""

    cfg: TrainConfig
    device: Any  # torch.device
    dist_info: Any  # adclr.distributed.DistInfo
    writer: Any = None  # TensorBoard's SummaryWriter on the main process with --tensorboard

    @property
    def main_process(self) -> bool:
        return self.dist_info.is_main

    @property
    def checkpoint_path(self) -> str:
        from adclr.checkpoint import LATEST

        return os.path.join(self.cfg.run.output_dir, LATEST)

    @property
    def log_path(self) -> str:
        return os.path.join(self.cfg.run.output_dir, "log.jsonl")

    def log(self, *values) -> None:
        """Print on the main process only."""
        if self.main_process:
            print(*values, flush=True)

    def kept(self) -> str:
        """Which checkpoint a stopped run leaves behind, for its last message."""
        exists = os.path.exists(self.checkpoint_path)
        return f"the last good checkpoint is {self.checkpoint_path}" if exists else "no checkpoint was written yet"

    def main_process_flag(self, value) -> bool:
        """The main process's ``value``, on every process."""
        import torch

        if not self.dist_info.enabled:
            return bool(value)
        flag = torch.tensor([float(bool(value))], device=self.device)
        torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())

    def barrier(self) -> None:
        import torch

        if self.dist_info.enabled:
            torch.distributed.barrier()

    def finish(self, evaluation: dict) -> None:
        """Close TensorBoard, print the final evaluation beside random init, leave the process group."""
        import torch

        from adclr.evaluation.during_training import run_summary

        if self.writer:
            self.writer.close()
        if evaluation:
            self.log(run_summary(self.cfg, evaluation))
        if self.dist_info.enabled:
            torch.distributed.destroy_process_group()


def start_run(cfg: TrainConfig, flags: dict, chosen_preset: bool) -> Run:
    """The device and its checks, the process group, the start-up lines (preset, config, notes, threads)."""
    import torch

    from adclr.distributed import init_distributed
    from adclr.kernels import device as device_facts
    from adclr.runtime import configure_threads
    from adclr.train_step import default_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg.optim.precision = cfg.optim.precision or default_precision(device)
    notes = check_device(cfg, device.type, device_facts.capability(device), device_facts.interpreter_enabled())
    dist_info = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    run = Run(cfg, device, dist_info)
    run.log(describe_preset(cfg, flags, chosen_preset))
    run.log("config: " + json.dumps(cfg.to_dict()))
    for note in notes:
        run.log(f"note: {note}")
    run.log(configure_threads(cfg.data.num_workers))
    return run


@dataclasses.dataclass
class TrainData:
    """The training images as multi-crop views plus query crops, sharded over the processes."""

    dataset: Any  # adclr.runtime.SeededItems
    sampler: Any  # DistributedSampler
    loader: Any  # DataLoader

    def set_epoch(self, epoch: int) -> None:
        """The epoch's shuffle and augmentation seeds."""
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)


def build_data(run: Run) -> TrainData:
    """Every image's multi-crop views plus query crops; then the output folder is created and locked (one
    run per folder)."""
    from torch.utils.data import DataLoader, DistributedSampler

    from adclr.augment import MultiCropAugmentation, MultiCropConfig
    from adclr.data import ImageFiles, SyntheticScenes, collate_multicrop
    from adclr.lock import hold_output_dir
    from adclr.runtime import SeededItems

    cfg, data, dist_info = run.cfg, run.cfg.data, run.dist_info
    augmentation = MultiCropAugmentation(MultiCropConfig.from_train_config(cfg))
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
        pin_memory=run.device.type == "cuda",
        drop_last=True,
        collate_fn=collate_multicrop,
    )
    if len(loader) == 0:
        source = f"--data_path {data.data_path}" if data.data_path else "the built-in set (--builtin_train_size)"
        processes = f" on each of {dist_info.world_size} processes" if dist_info.enabled else ""
        raise UserError(
            f"{source} has {len(dataset)} images, fewer than one batch of {batch_size} per process{processes}; "
            "lower --batch_size_per_gpu"
        )
    os.makedirs(cfg.run.output_dir, exist_ok=True)
    for note in hold_output_dir(cfg.run.output_dir) if run.main_process else []:
        run.log(f"note: {note}")
    return TrainData(dataset, sampler, loader)


def build_state(run: Run, iters_per_epoch: int):
    """Student, teacher (EMA of the student), loss, optimizer; the per-iteration schedules."""
    from adclr.schedules import build_schedules
    from adclr.train_step import build_train_state

    state = build_train_state(run.cfg, run.device, distributed=run.dist_info.enabled)
    return state, build_schedules(run.cfg, iters_per_epoch, run.dist_info.world_size)


def resume(run: Run, state) -> tuple[int, list]:
    """Load the output folder's checkpoint into ``state`` if there is one (a corrupt one is set aside) and open
    TensorBoard; returns ``(epochs done, history)``."""
    from adclr.checkpoint import find_resumable, restore, set_aside

    start_epoch, history = 0, []
    saved, corrupt = find_resumable(run.cfg.run.output_dir)
    if saved:
        restore(saved, state)  # a checkpoint that does not fit this run stops it before anything is renamed
        start_epoch, history = saved.epoch, saved.history
    run.barrier()  # every process has read its checkpoint before a corrupt one is renamed
    if run.main_process:
        for path, reason in corrupt:
            run.log(f"warning: {reason}; moved it to {set_aside(path)}")
    if saved:
        now = run.cfg.flat()
        changed = {name: (value, now[name]) for name, value in saved.config.flat().items() if value != now[name]}
        run.log(
            f"resumed from {saved.path} at epoch {start_epoch}" + (f"; changed since: {changed}" if changed else "")
        )
    if run.cfg.run.tensorboard and run.main_process:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional `tensorboard` package

        run.writer = SummaryWriter(os.path.join(run.cfg.run.output_dir, "tensorboard"))
    return start_epoch, history


class SkippedSteps:
    """Counts the optimizer steps the fp16 gradient scaler skipped (non-finite gradients), per epoch and in a
    row across epochs; ``MAX_SKIPPED_STEPS`` in a row stop the run."""

    def __init__(self, run: Run):
        self.run, self.in_epoch, self.in_a_row = run, 0, 0

    def update(self, skipped: bool, loss_scale: float, epoch: int, it: int) -> None:
        """After iteration ``it`` of ``epoch``: whether its step was ``skipped``, and the scaler's scale now."""
        if not skipped:
            self.in_a_row = 0
            return
        self.in_epoch, self.in_a_row = self.in_epoch + 1, self.in_a_row + 1
        if self.in_a_row == MAX_SKIPPED_STEPS:
            raise SystemExit(
                f"the fp16 gradient scaler skipped the last {MAX_SKIPPED_STEPS} optimizer steps in a row "
                f"(non-finite gradients every time; loss scale now {loss_scale:.1e}) at epoch "
                f"{epoch + 1}, iteration {it}; stopping training ({self.run.kept()}). Try --precision bf16 or fp32, "
                "or a lower --lr."
            )


def train_one_epoch(run: Run, state, schedules, data: TrainData, epoch: int, skipped: SkippedSteps, evaluation) -> dict:
    """One pass over the data: a training step per batch, a progress bar (with ``evaluation``'s last
    results), and the epoch's record: mean losses over every process, schedules and speed."""
    import torch
    from tqdm import tqdm

    from adclr.runtime import seed_everything
    from adclr.train_step import NonFiniteLossError, StepLosses, training_step

    cfg, device, dist_info = run.cfg, run.device, run.dist_info
    seed_everything(cfg.run.seed + 1000 * epoch + dist_info.rank)  # augmentations, drop-path: resumable
    data.set_epoch(epoch)
    state.student.train()
    sums = {f.name: 0.0 for f in dataclasses.fields(StepLosses)}
    skipped.in_epoch = 0
    iters_per_epoch, total_batch = len(data.loader), cfg.optim.batch_size_per_gpu * dist_info.world_size
    progress = tqdm(
        data.loader, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", disable=not run.main_process, dynamic_ncols=True
    )
    tic = time.perf_counter()
    for it, (crops, query_crops, _) in enumerate(progress):
        settings = schedules.at(epoch * iters_per_epoch + it)
        crops = [c.to(device, non_blocking=True) for c in crops]
        # Without a query loss (Q = 0 or lambda = 0) the query tokens would be computed for nothing.
        query_crops = query_crops.to(device, non_blocking=True) if cfg.uses_query_loss else None
        scale = state.scaler.get_scale()  # 1.0 (and no GPU sync) unless fp16
        try:
            losses = training_step(state, crops, query_crops, settings)
        except NonFiniteLossError as error:
            raise SystemExit(
                f"{error} at epoch {epoch + 1}, iteration {it}; stopping training ({run.kept()})."
            ) from None
        # A lower scale: the scaler found non-finite gradients and skipped the update.
        new_scale = state.scaler.get_scale()
        skipped.update(new_scale < scale, new_scale, epoch, it)

        values = dataclasses.asdict(losses)
        for name, value in values.items():
            sums[name] += value
        images_per_s = total_batch * (it + 1) / (time.perf_counter() - tic)
        progress.set_postfix(progress_line(values, settings.lr, images_per_s, evaluation, device))

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
        record["skipped_steps"] = skipped.in_epoch
    return record


def progress_line(losses: dict, lr: float, images_per_s: float, evaluation: dict, device) -> dict:
    """The progress bar's values: this step's losses, lr and speed, the last evaluation's results (to
    watch learning) and, on a GPU, the peak memory."""
    import torch

    line = {name: f"{losses[name]:.3f}" for name in ("loss", "cls", "query")}
    line.update(lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
    for short, key in (("knn", "knn_top1_teacher"), ("miou", "dense_miou_teacher")):
        if key in evaluation:
            line[short] = f"{evaluation[key]:.1f}"
    if device.type == "cuda":
        line["mem"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}G"
    return line


def save(run: Run, state, epoch: int, history: list) -> None:
    """``checkpoint.pth`` after ``epoch`` epochs (and ``checkpointNNNN.pth`` every ``--saveckp_freq``)."""
    from adclr.checkpoint import save_checkpoint

    save_checkpoint(run.checkpoint_path, state, run.cfg, epoch, history)
    if run.cfg.run.saveckp_freq and epoch % run.cfg.run.saveckp_freq == 0:
        numbered = os.path.join(run.cfg.run.output_dir, f"checkpoint{epoch:04d}.pth")
        save_checkpoint(numbered, state, run.cfg, epoch, history)


class Evaluator:
    """The run's evaluation: due at the last epoch and every ``--eval_every``; the random-init baseline is
    evaluated once, at the first evaluation; ``latest`` holds the last results."""

    def __init__(self, run: Run):
        self.run, self.latest, self.baseline = run, {}, {}

    def due(self, epoch: int) -> bool:
        every = self.run.cfg.run.eval_every
        return epoch == self.run.cfg.optim.epochs or bool(every and epoch % every == 0)

    def __call__(self, teacher_backbone) -> dict:
        from adclr.evaluation.during_training import evaluate_run
        from adclr.train_step import random_init_backbone

        run = self.run
        if not self.baseline:  # the same architecture at its initialisation, evaluated once per run
            init = random_init_backbone(run.cfg).to(run.device)
            self.baseline = evaluate_run(run.cfg, init, run.device, "random_init", run.dist_info)
        self.latest = {**evaluate_run(run.cfg, teacher_backbone, run.device, "teacher", run.dist_info), **self.baseline}
        return self.latest


def end_epoch(run: Run, state, history: list, record: dict, evaluator: Evaluator) -> None:
    """After an epoch's checkpoint: its evaluation if one is due (every process extracts a shard of the
    images; the main one rewrites the checkpoints with the results), then ``log.jsonl`` rewritten from the
    history and TensorBoard. Every process calls it."""
    from adclr.files import atomic_write

    epoch = record["epoch"]
    if evaluator.due(epoch):
        record.update(evaluator(state.teacher.backbone))
        run.log("evaluation: " + json.dumps(evaluator.latest))
        if run.main_process:
            save(run, state, epoch, history)
    if run.main_process:
        with atomic_write(run.log_path, "w") as f:  # one line per epoch of the history: none lost, none twice
            f.writelines(json.dumps(r) + "\n" for r in history)
        if run.writer:
            for key, value in record.items():
                run.writer.add_scalar(key, value, epoch)


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
