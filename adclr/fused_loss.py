"""The DINO head's last layer fused with the ADCLR loss: the ``[tokens, K]`` logits never exist at once.

The heads stop at their L2-normalised bottleneck (``MultiCropWrapper(..., head_features=True)``); this
module applies the weight-normalised last layer and the loss together, a chunk of images at a time
(a view pair never crosses images). Per chunk: teacher logits -> centred, sharpened softmax; student
logits -> soft cross-entropy against the teacher views it is paired with, with the gradient w.r.t.
the logits in closed form (``(sum(q) softmax(z / T) - q) / T``) written in place; then the gradients
of the bottleneck features and of the last layer's weight are accumulated (``dZ @ W`` and
``dZ^T @ f``). All of this happens in the forward pass, so the backward only scales what it stored by
the incoming gradient (Liger-Kernel's fused linear cross-entropy). Only chunk-sized ``[rows, K]``
buffers are allocated; the rows go through ``adclr.kernels.dino_soft_cross_entropy_`` (a Triton row
kernel on CUDA, chunked PyTorch elsewhere). The teacher's centre statistic, the column sums of its raw
logits, is ``(sum of its features) @ W^T``: one matrix-vector product.

Chunking over K as well (an online log-sum-exp across K chunks) would need the student logits twice,
one extra matmul, to bound memory that the row chunks already bound; the row kernel does its
log-sum-exp online over blocks of K instead.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .heads import HeadFeatures
from .kernels import LOSS_BACKENDS, dino_soft_cross_entropy_, dino_teacher_probs
from .loss import CentredLoss, LossTerms, TeacherEntropyAccumulator, ema_center_

# Default rows of student logits per chunk, as elements of one [rows, K] buffer: 2^24 is 256 rows at
# K = 65536 (64 MiB in fp32, 32 MiB in bf16). Larger chunks run larger matmuls; unmeasured on GPUs.
DEFAULT_CHUNK_ELEMENTS = 2**24


def default_chunk_rows(out_dim: int) -> int:
    """Student logit rows per chunk for a head with ``out_dim`` outputs (``DEFAULT_CHUNK_ELEMENTS``)."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // out_dim)


def _compute_dtype(features: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmuls' dtype: autocast's where autocast is on (as ``nn.Linear`` would), else the inputs'."""
    device_type = features.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.result_type(features, weight)


def _target_index(num_views: int, n: int, device: torch.device) -> torch.Tensor:
    """Target row of each student row ``(view v, item j)``: teacher view 1 for v = 0, view 0 for v = 1,
    their sum for the rest; the target buffer holds ``[teacher view 0, teacher view 1, sum]``, n rows each."""
    blocks = torch.tensor([1, 0] + [2] * (num_views - 2), device=device)
    return (blocks[:, None] * n + torch.arange(n, device=device)).flatten()


class _DINOCrossEntropy(torch.autograd.Function):
    """The chunked forward computes the loss and every gradient; the backward scales them."""

    @staticmethod
    def forward(
        ctx,
        student,
        teacher,
        weight,
        teacher_weight,
        center,
        student_temp,
        teacher_temp,
        chunk_rows,
        backend,
        grads,
        entropy,
    ):
        V, M, D = student.shape
        K = weight.shape[0]
        device = student.device
        need_features, need_weight = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[2]
        dtype = _compute_dtype(student, weight)
        with torch.autocast(device.type, enabled=False):
            w = weight.detach().to(dtype)
            w_teacher = teacher_weight.detach().to(dtype)
            center = center.detach().float().reshape(K)
            items = max(1, chunk_rows // V)  # items (images, or image x query) per chunk
            pair_weight = 1.0 / (2 * (V - 1) * M)  # mean over (teacher view i, student view v != i) and items
            # The gradient rows stay unweighted (entries in [-2, 2]: no fp16 underflow, unlike the unfused
            # loss's ~1/(pairs x items x K) entries); weight and temperature are applied in fp32 after the matmuls.
            grad_factor = pair_weight / student_temp
            target_blocks = 3 if V > 2 else 2

            loss = torch.zeros((), dtype=torch.float32, device=device)
            grad_features = torch.empty(V, M, D, dtype=torch.float32, device=device) if need_features else None
            grad_weight = torch.zeros(K, D, dtype=torch.float32, device=device) if need_weight else None
            for start in range(0, M, items):
                stop = min(M, start + items)
                n = stop - start
                targets = torch.empty(target_blocks * n, K, dtype=torch.float32, device=device)
                teacher_logits = teacher[:, start:stop].reshape(2 * n, D).to(dtype) @ w_teacher.T
                dino_teacher_probs(teacher_logits, center, teacher_temp, out=targets[: 2 * n], backend=backend)
                del teacher_logits
                if entropy is not None:
                    entropy.add(targets[: 2 * n])
                if target_blocks == 3:
                    torch.add(targets[:n], targets[n : 2 * n], out=targets[2 * n :])
                features = student[:, start:stop].reshape(V * n, D).to(dtype)
                logits = features @ w.T  # becomes the gradient w.r.t. logits / T
                rows = dino_soft_cross_entropy_(
                    logits,
                    targets,
                    _target_index(V, n, device),
                    student_temp,
                    backend=backend,
                )
                del targets
                loss += rows.sum()
                if need_features:
                    grad_features[:, start:stop] = (logits @ w).view(V, n, D).float().mul_(grad_factor)
                if need_weight:
                    if dtype == torch.float32:
                        grad_weight.addmm_(logits.T, features, alpha=grad_factor)
                    else:
                        grad_weight.add_(logits.T @ features, alpha=grad_factor)
                del logits
        ctx.save_for_backward(grad_features, grad_weight)
        ctx.dtypes = student.dtype, weight.dtype
        return loss * pair_weight

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_features, grad_weight = ctx.saved_tensors
        features_dtype, weight_dtype = ctx.dtypes
        if grad_features is not None:
            grad_features = (grad_features * grad_loss).to(features_dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(weight_dtype)
        return grad_features, None, grad_weight, None, None, None, None, None, None, None, None


def dino_cross_entropy(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    center: torch.Tensor,
    *,
    student_temp: float,
    teacher_temp: float,
    chunk_rows: int | None = None,
    backend: str = "auto",
    entropy: TeacherEntropyAccumulator | None = None,
) -> torch.Tensor:
    """DINO's multi-view soft cross-entropy, computed from bottleneck features through the last layer.

    ``student [V, M, D]``: V views (the first two are the teacher's) of M items (images, or image x
    query); ``teacher [2, M, D]``; ``weight`` / ``teacher_weight [K, D]``: the last layers' effective
    weights; ``center [K]``. Returns the mean over the pairs (teacher view i, student view v != i) and
    the items of ``H(softmax((t_i W_t^T - center) / teacher_temp), softmax(s_v W^T / student_temp))``,
    equal to the unfused loss on the logits. Gradients reach ``student`` and ``weight`` only (the
    teacher side is a constant target). ``chunk_rows`` bounds the student logit rows computed at once
    (rounded down to whole items, at least one); ``backend`` is that of ``dino_soft_cross_entropy_``.
    ``entropy``, if given, takes in every teacher probability row (the collapse monitor).
    """
    for name, t in (("student", student), ("teacher", teacher), ("weight", weight), ("teacher_weight", teacher_weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(t, 'dtype', type(t))}")
    if student.dim() != 3 or student.shape[0] < 2:
        raise ValueError(f"student must be [views >= 2, items, D], got shape {tuple(student.shape)}")
    V, M, D = student.shape
    if tuple(teacher.shape) != (2, M, D):
        raise ValueError(
            f"teacher must be [2, {M}, {D}] (two views of the student's items), got {tuple(teacher.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != D or tuple(teacher_weight.shape) != tuple(weight.shape):
        shapes = f"{tuple(weight.shape)} and {tuple(teacher_weight.shape)}"
        raise ValueError(f"weight and teacher_weight must both be [K, {D}], got {shapes}")
    K = weight.shape[0]
    if not isinstance(center, torch.Tensor) or center.numel() != K:
        raise ValueError(f"center must be a tensor of K = {K} elements, got {getattr(center, 'shape', center)}")
    devices = {t.device for t in (student, teacher, weight, teacher_weight, center)}
    if len(devices) != 1:
        raise ValueError(f"student, teacher, weights and center must be on one device, got {devices}")
    for name, temp in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
        if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not temp > 0:
            raise ValueError(f"{name} must be a float > 0, got {temp!r}")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(K)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    if backend not in LOSS_BACKENDS:
        raise ValueError(f"backend must be one of {LOSS_BACKENDS}, got {backend!r}")
    if M == 0:
        raise ValueError("student and teacher hold no items (M = 0)")
    grads = torch.is_grad_enabled()  # no gradient work under no_grad (the Function cannot tell)
    return _DINOCrossEntropy.apply(
        student,
        teacher,
        weight,
        teacher_weight,
        center,
        float(student_temp),
        float(teacher_temp),
        chunk_rows,
        backend,
        grads,
        entropy,
    )


@torch.no_grad()
def logit_column_sum(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(features @ weight^T).sum(0)`` as ``features.sum(0) @ weight^T``, in fp32: the centre statistic."""
    with torch.autocast(features.device.type, enabled=False):
        return features.detach().reshape(-1, features.shape[-1]).float().sum(0) @ weight.detach().float().T


class FusedADCLRLoss(CentredLoss):
    """``ADCLRLoss`` computed from the heads' bottleneck features: same loss, centres and gradients.

    The CLS term is ``dino_cross_entropy`` over the crops of each image, the query term the same over
    the two global views of each (image, query) pair; centres move as ``ADCLRLoss``'s do, from the
    teacher's logit column sums. Its buffers are ``ADCLRLoss``'s, so checkpoints load into either.
    """

    def __init__(self, *args, chunk_rows: int | None = None, backend: str = "auto", **kwargs):
        """``CentredLoss``'s arguments, and the chunking and row backend of ``dino_cross_entropy``."""
        super().__init__(*args, **kwargs)
        if backend not in LOSS_BACKENDS:
            raise ValueError(f"backend must be one of {LOSS_BACKENDS}, got {backend!r}")
        self.chunk_rows = chunk_rows
        self.backend = backend

    def forward(self, student: HeadFeatures, teacher: HeadFeatures, teacher_temp: float) -> LossTerms:
        """``student`` / ``teacher``: ``MultiCropWrapper(..., head_features=True)`` outputs (teacher: 2 crops)."""
        for name, x in (("student", student), ("teacher", teacher)):
            if not isinstance(x, HeadFeatures):
                raise TypeError(
                    f"{name} must be HeadFeatures (MultiCropWrapper(..., head_features=True)), got {type(x).__name__}"
                )
        if student.weight.shape[0] != self.out_dim:
            raise ValueError(f"the heads have K = {student.weight.shape[0]} outputs, the loss out_dim = {self.out_dim}")
        rows = student.cls.shape[0]
        if rows % self.num_crops:
            raise ValueError(f"student.cls has {rows} rows, not a multiple of num_crops = {self.num_crops}")
        B = rows // self.num_crops
        if teacher.cls.shape[0] != 2 * B:
            raise ValueError(f"teacher.cls must hold the 2 global crops of {B} images, got {teacher.cls.shape[0]} rows")
        if (student.queries is None) != (teacher.queries is None):
            raise ValueError("student and teacher must both have query features or both have none")
        options = dict(
            student_temp=self.student_temp,
            teacher_temp=float(teacher_temp),
            chunk_rows=self.chunk_rows,
            backend=self.backend,
        )
        cls_entropy = TeacherEntropyAccumulator(self.out_dim, student.cls.device)
        cls_loss = dino_cross_entropy(
            student.cls.unflatten(0, (self.num_crops, B)),
            teacher.cls.unflatten(0, (2, B)),
            student.weight,
            teacher.weight,
            self.center,
            entropy=cls_entropy,
            **options,
        )
        query_loss, query_entropy = cls_loss.new_zeros(()), None
        if self.has_query_term(student.queries):
            if student.queries.shape[0] != 2 or teacher.queries.shape != student.queries.shape:
                raise ValueError(
                    f"query features must be [2, B, Q, D] for student and teacher alike, got "
                    f"{tuple(student.queries.shape)} and {tuple(teacher.queries.shape)}"
                )
            query_entropy = TeacherEntropyAccumulator(self.out_dim, student.cls.device)
            query_loss = dino_cross_entropy(
                student.queries.flatten(1, 2),
                teacher.queries.flatten(1, 2),
                student.query_weight,
                teacher.query_weight,
                self.query_center,
                entropy=query_entropy,
                **options,
            )
            query_entropy = query_entropy.result()
        self.update_centers(teacher)
        return LossTerms(
            total=cls_loss + self.lambda_query * query_loss,
            cls=cls_loss,
            query=query_loss,
            cls_entropy=cls_entropy.result(),
            query_entropy=query_entropy,
        )

    @torch.no_grad()
    def update_centers(self, teacher: HeadFeatures) -> None:
        """``ADCLRLoss.update_centers`` from the teacher's features: its logits are never formed."""
        m = self.center_momentum
        ema_center_(self.center, logit_column_sum(teacher.cls, teacher.weight), teacher.cls.shape[0], m)
        if teacher.queries is not None:
            query_rows = teacher.queries.shape[:-1].numel()
            ema_center_(self.query_center, logit_column_sum(teacher.queries, teacher.query_weight), query_rows, m)
