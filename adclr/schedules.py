"""DINO's per-iteration schedules (learning rate, weight decay, teacher temperature and momentum) and the
values of one iteration.

    schedules = build_schedules(config, iters_per_epoch, world_size)
    settings = schedules.at(step)            # StepSettings: plain floats for adclr.train_step.training_step
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import TrainConfig


def cosine_schedule(
    base: float, final: float, epochs: int, iters_per_epoch: int, warmup_epochs: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Per-iteration values: linear warm-up from ``warmup_start`` to ``base``, then cosine to ``final``."""
    warmup_iters = min(warmup_epochs, epochs) * iters_per_epoch
    warmup = np.linspace(warmup_start, base, warmup_iters, endpoint=False) if warmup_iters else np.array([])
    steps = np.arange(epochs * iters_per_epoch - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


def teacher_temp_schedule(
    warmup_temp: float, temp: float, warmup_epochs: int, epochs: int, iters_per_epoch: int
) -> np.ndarray:
    """Per-iteration teacher temperature: linear ``warmup_temp -> temp`` over ``warmup_epochs``, then flat."""
    warmup_iters = min(warmup_epochs, epochs) * iters_per_epoch
    return np.concatenate(
        [
            np.linspace(warmup_temp, temp, warmup_iters, endpoint=False) if warmup_iters else np.array([]),
            np.full(epochs * iters_per_epoch - warmup_iters, temp),
        ]
    )


@dataclass
class StepSettings:
    """The scheduled values of one iteration (``Schedules.at``)."""

    lr: float
    weight_decay: float
    teacher_temp: float
    momentum: float  # of the teacher's EMA
    freeze_last_layer: bool


@dataclass
class Schedules:
    """Per-iteration schedules of a whole run (numpy arrays of ``epochs * iters_per_epoch`` values)."""

    lr: np.ndarray
    weight_decay: np.ndarray
    teacher_temp: np.ndarray
    momentum: np.ndarray
    iters_per_epoch: int
    freeze_last_layer_epochs: int

    def at(self, step: int) -> StepSettings:
        return StepSettings(
            lr=float(self.lr[step]),
            weight_decay=float(self.weight_decay[step]),
            teacher_temp=float(self.teacher_temp[step]),
            momentum=float(self.momentum[step]),
            freeze_last_layer=step // self.iters_per_epoch < self.freeze_last_layer_epochs,
        )


def build_schedules(config: TrainConfig, iters_per_epoch: int, world_size: int = 1) -> Schedules:
    """DINO's schedules: lr warm-up then cosine (scaled by total batch / 256), cosine weight decay and
    teacher momentum (to 1), teacher temperature warm-up."""
    optim, loss, epochs = config.optim, config.loss, config.optim.epochs
    total_batch = optim.batch_size_per_gpu * world_size
    return Schedules(
        lr=cosine_schedule(optim.lr * total_batch / 256, optim.min_lr, epochs, iters_per_epoch, optim.warmup_epochs),
        weight_decay=cosine_schedule(optim.weight_decay, optim.weight_decay_end, epochs, iters_per_epoch),
        teacher_temp=teacher_temp_schedule(
            loss.warmup_teacher_temp, loss.teacher_temp, loss.warmup_teacher_temp_epochs, epochs, iters_per_epoch
        ),
        momentum=cosine_schedule(loss.momentum_teacher, 1.0, epochs, iters_per_epoch),
        iters_per_epoch=iters_per_epoch,
        freeze_last_layer_epochs=optim.freeze_last_layer,
    )
