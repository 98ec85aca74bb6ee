"""The small parts ``adclr.engine`` composes: schedules, process groups, seeding, parameter groups, clipping, EMA."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


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
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK); a plain run stays single."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return info


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Weight decay on weight matrices only: biases and norm parameters (1-D) get none."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "fixed_weight_decay": True}]


def clip_gradients_per_parameter(model: torch.nn.Module, max_norm: float) -> None:
    """DINO's clipping: each parameter's gradient norm is clipped to ``max_norm`` on its own."""
    for param in model.parameters():
        if param.grad is not None:
            torch.nn.utils.clip_grad_norm_(param, max_norm)


def cancel_last_layer_gradients(model: torch.nn.Module) -> None:
    """Freeze the heads' last layer (DINO keeps it fixed during the first epoch for stability)."""
    for name, param in model.named_parameters():
        if "last_layer" in name:
            param.grad = None


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, over all parameters at once."""
    teacher_params = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)
