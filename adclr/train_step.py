"""The state a run trains (networks, loss, optimizer built from a ``TrainConfig``) and one training step.

``train.py`` (the command line and the loop), the benchmarks and the tests all use these, so the
iteration they time or check is the one a run executes:

    state = build_train_state(config, device)              # student, teacher (EMA), loss, AdamW, scaler
    schedules = build_schedules(config, iters_per_epoch)    # adclr.schedules: lr, weight decay, temperature, momentum
    losses = training_step(state, crops, query_crops, schedules.at(step))   # plain floats

A non-finite loss raises ``NonFiniteLossError`` before anything changes: no parameter, optimizer,
scaler, EMA or loss-centre update. Checkpoints of a ``TrainState`` are in ``adclr.checkpoint``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .config import TrainConfig
from .fused_loss import FusedADCLRLoss
from .heads import DINOHead
from .kernels.device import supports_bf16
from .loss import ADCLRLoss
from .model import ADCLRVisionTransformer, MultiCropWrapper, build_vit
from .runtime import seeded
from .schedules import StepSettings

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
    return "bf16" if supports_bf16(torch.cuda.get_device_capability(device)) else "fp16"


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

    The separate query head is built only when the query loss uses it (``config.uses_query_loss``).
    """
    model = config.model
    backbone = build_backbone(config, drop_path_rate)

    def head() -> DINOHead:
        return DINOHead(
            backbone.embed_dim,
            model.out_dim,
            model.head_hidden_dim,
            model.head_bottleneck_dim,
            norm_last_layer=model.norm_last_layer,
        )

    return MultiCropWrapper(backbone, head(), head() if model.separate_query_head and config.uses_query_loss else None)


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
    loss_args = dict(num_crops=2 + config.data.local_crops_number, lambda_query=config.loss.lambda_query)
    if config.loss.fused_loss:
        loss = FusedADCLRLoss(config.model.out_dim, **loss_args, backend=config.loss.loss_backend).to(device)
    else:
        loss = ADCLRLoss(config.model.out_dim, **loss_args).to(device)
    precision = config.optim.precision or default_precision(device)  # the config checked the name
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


def _finite_everywhere(finite_here: bool, device: torch.device) -> bool:
    """Whether every process saw a finite loss: all stop together rather than hang in DDP's all-reduce."""
    if not (dist.is_available() and dist.is_initialized()):
        return finite_here
    flag = torch.tensor([1.0 if finite_here else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
