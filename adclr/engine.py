"""The training engine: networks, loss and optimizer built from a ``TrainConfig``, and one training step.

``train.py`` (the command line and the loop), the benchmarks and the tests all use these, so the
iteration they time or check is the one a run executes:

    state = build_train_state(config, device)              # student, teacher (EMA), loss, AdamW, scaler
    schedules = build_schedules(config, iters_per_epoch)    # per-iteration lr, weight decay, temperature, momentum
    losses = training_step(state, crops, query_crops, schedules.at(step))   # plain floats

A non-finite loss raises ``NonFiniteLossError`` before anything changes: no parameter, optimizer,
scaler, EMA or loss-centre update. Checkpoints of a ``TrainState`` are in ``adclr.checkpoint``.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .config import TrainConfig
from .fused_loss import FusedADCLRLoss
from .heads import DINOHead
from .loss import ADCLRLoss
from .model import ADCLRVisionTransformer, MultiCropWrapper, build_vit
from .training import (
    cancel_last_layer_gradients,
    clip_gradients_per_parameter,
    cosine_schedule,
    ema_update,
    param_groups,
    seed_everything,
    teacher_temp_schedule,
)

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(FloatingPointError):
    """The loss of a step was NaN or infinite (here or, under DDP, on another process); nothing was updated."""

    def __init__(self, losses: StepLosses, on_this_process: bool = True):
        self.losses = losses
        if on_this_process:
            message = f"Loss is {losses.loss}"
        else:
            message = f"Loss is not finite on another process (here it is {losses.loss})"
        super().__init__(message)


@dataclass
class StepLosses:
    """The loss terms of one step as Python floats: ``loss = cls + lambda_query * query``; and the
    teacher's entropies (``adclr.loss.TeacherEntropy``, nats) per branch, the query ones NaN without
    a query loss."""

    loss: float
    cls: float
    query: float
    cls_entropy: float = math.nan
    cls_batch_entropy: float = math.nan
    query_entropy: float = math.nan
    query_batch_entropy: float = math.nan


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


@dataclass
class TrainState:
    """Everything a training step reads and updates.

    ``student_ddp`` is the module the student's forward goes through: ``DistributedDataParallel(student)``
    under torchrun, else ``student`` itself. ``autocast_dtype`` is None for fp32.
    """

    student: MultiCropWrapper
    teacher: MultiCropWrapper
    loss: ADCLRLoss | FusedADCLRLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    student_ddp: torch.nn.Module
    autocast_dtype: torch.dtype | None = None
    clip_grad: float = 0.0


def default_precision(device: torch.device) -> str:
    """bf16 autocast on CUDA GPUs with bf16 matrix units (sm80+), fp16 on older ones (V100: bf16 would be
    emulated); fp32 on CPU, where autocast without bf16 matrix units is slower than fp32."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"


def build_backbone(
    config: TrainConfig, drop_path_rate: float = 0.0, attn_backend: str | None = None
) -> ADCLRVisionTransformer:
    """The run's ViT (``attn_backend`` defaults to the config's)."""
    model = config.model
    return build_vit(
        model.arch,
        model.patch_size,
        config.data.global_size,
        drop_path_rate=drop_path_rate,
        query_keys=model.query_keys,
        bidirectional=model.bidirectional,
        attn_backend=attn_backend or model.attn_backend,
    )


def build_network(config: TrainConfig, drop_path_rate: float) -> MultiCropWrapper:
    """The ViT with its DINO head (and a query head if asked for): the student or the teacher.

    The separate query head is built only when the query loss uses it (``num_query > 0`` and
    ``lambda_query != 0``): a head that gets no gradient makes DDP fail on the next iteration.
    """
    model = config.model
    query_loss_used = config.data.num_query > 0 and config.loss.lambda_query != 0
    backbone = build_backbone(config, drop_path_rate)

    def head() -> DINOHead:
        return DINOHead(
            backbone.embed_dim,
            model.out_dim,
            model.head_hidden_dim,
            model.head_bottleneck_dim,
            norm_last_layer=model.norm_last_layer,
        )

    return MultiCropWrapper(backbone, head(), head() if model.separate_query_head and query_loss_used else None)


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block under ``seed_everything(seed)``, then restore the Python, numpy and torch CPU RNGs."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_everything(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def build_train_state(config: TrainConfig, device: torch.device, distributed: bool | None = None) -> TrainState:
    """Student, teacher, loss, AdamW and gradient scaler of ``config`` on ``device``.

    The networks are initialised from ``config.run.seed`` alone, identically on every process (the
    teacher starts as a copy of the student), and without disturbing the global random state.
    ``distributed`` (default: whether a process group is initialised) wraps the student in DDP.
    """
    with seeded(config.run.seed):
        student = build_network(config, config.model.drop_path_rate).to(device)
        teacher = build_network(config, 0.0).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    student_ddp = (
        DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
        if distributed
        else student
    )
    loss_class = FusedADCLRLoss if config.loss.fused_loss else ADCLRLoss
    loss = loss_class(
        config.model.out_dim, num_crops=2 + config.data.local_crops_number, lambda_query=config.loss.lambda_query
    ).to(device)
    precision = config.optim.precision or default_precision(device)
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {tuple(AUTOCAST_DTYPES)}, got {precision!r}")
    return TrainState(
        student=student,
        teacher=teacher,
        loss=loss,
        optimizer=torch.optim.AdamW(param_groups(student)),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        student_ddp=student_ddp,
        autocast_dtype=AUTOCAST_DTYPES[precision],
        clip_grad=config.optim.clip_grad,
    )


def random_init_backbone(config: TrainConfig) -> ADCLRVisionTransformer:
    """The run's backbone as it was before training (same seed, same initialisation): the k-NN baseline."""
    with seeded(config.run.seed):  # the student's backbone is the first thing build_network makes
        return build_backbone(config, config.model.drop_path_rate).eval()


def training_step(
    state: TrainState, crops: list[torch.Tensor], query_crops: torch.Tensor | None, settings: StepSettings
) -> StepLosses:
    """One ADCLR iteration: teacher on the global crops, student on every crop, loss, update, EMA.

    ``crops``: 2 global then the local ``[B, 3, s, s]`` batches; ``query_crops``: ``[B, Q, 3, p, p]`` or
    None. Raises ``NonFiniteLossError`` before any update when the loss is not finite on any process.
    """
    # The loss updates its centres during its forward; keep them to undo that if the loss is not finite.
    centres = [buffer.clone() for buffer in state.loss.buffers()]
    dtype = state.autocast_dtype
    with torch.autocast(crops[0].device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        if isinstance(state.loss, FusedADCLRLoss):  # the heads stop at their bottleneck; the loss applies W
            with torch.no_grad():
                teacher_features = state.teacher(crops[:2], query_crops, head_features=True)
            student_features = state.student_ddp(crops, query_crops, head_features=True)
            terms = state.loss(student_features, teacher_features, settings.teacher_temp)
        else:
            with torch.no_grad():
                teacher_cls, teacher_query = state.teacher(crops[:2], query_crops)
            student_cls, student_query = state.student_ddp(crops, query_crops)
            terms = state.loss(student_cls, teacher_cls, student_query, teacher_query, settings.teacher_temp)
    values = [terms.total, terms.cls, terms.query]
    for entropy in (terms.cls_entropy, terms.query_entropy):
        values += [entropy.mean, entropy.of_mean] if entropy is not None else [terms.total.new_tensor(math.nan)] * 2
    losses = StepLosses(*torch.stack([v.float() for v in values]).tolist())  # one device sync
    finite_here = math.isfinite(losses.loss)
    if not _finite_everywhere(finite_here, terms.total.device):
        with torch.no_grad():
            for buffer, saved in zip(state.loss.buffers(), centres):
                buffer.copy_(saved)
        raise NonFiniteLossError(losses, on_this_process=not finite_here)

    optimizer = state.optimizer
    for group in optimizer.param_groups:
        group["lr"] = settings.lr
        if not group.get("fixed_weight_decay"):
            group["weight_decay"] = settings.weight_decay
    optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(terms.total).backward()
    state.scaler.unscale_(optimizer)
    if state.clip_grad > 0:
        clip_gradients_per_parameter(state.student, state.clip_grad)
    if settings.freeze_last_layer:
        cancel_last_layer_gradients(state.student)
    state.scaler.step(optimizer)
    state.scaler.update()
    ema_update(state.teacher, state.student, settings.momentum)
    return losses


def _finite_everywhere(finite_here: bool, device: torch.device) -> bool:
    """Whether every process saw a finite loss: all stop together rather than hang in DDP's all-reduce."""
    if not (dist.is_available() and dist.is_initialized()):
        return finite_here
    flag = torch.tensor([1.0 if finite_here else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def collapse_warnings(record: dict, out_dim: int) -> list[str]:
    """What an epoch's mean teacher entropies (``StepLosses`` fields in ``record``) say of collapse.

    Uniform collapse: the teacher's per-image outputs flatten (mean entropy above 0.75 ln K) and the CLS
    loss drifts up towards ln K. One-hot collapse: every image's output piles onto a few dimensions (the
    batch-mean output's entropy below 0.25 ln K: fewer than K^(1/4) dimensions used by a whole batch).
    Healthy runs of the built-in preset stay below 0.6 ln K and above 0.35 ln K respectively
    (bench/results/2026-12-05_cpu_collapse).
    """
    warnings, ln_k = [], math.log(out_dim)
    for branch in ("cls", "query"):
        mean, of_mean = record.get(f"{branch}_entropy"), record.get(f"{branch}_batch_entropy")
        if mean is None or of_mean is None or out_dim < 2:
            continue
        if mean > 0.75 * ln_k:
            warnings.append(
                f"the teacher's {branch} outputs are collapsing to uniform (mean entropy {mean:.2f} of ln K = "
                f"{ln_k:.2f}); try a lower --teacher_temp or --lr, a higher --momentum_teacher, or fewer/larger "
                "local crops (--local_crops_number, --local_crops_scale)"
            )
        elif of_mean < 0.25 * ln_k:
            warnings.append(
                f"the teacher's {branch} outputs are collapsing to one dimension (entropy of the batch-mean output "
                f"{of_mean:.2f} of ln K = {ln_k:.2f}); try a higher --teacher_temp or a lower --lr"
            )
    return warnings
