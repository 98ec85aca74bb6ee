"""The fused head-output + loss against float64 and against the unfused ``ADCLRLoss`` it replaces.

Row operations (Triton under the interpreter, and PyTorch) against float64 on poisoned outputs; the
chunked op against float64 on features; then the whole head + loss on a tiny ADCLR model for
Q in {0, 1, 10}, 2/4/6 crops, shared and separate query heads, both last-layer normalisations, fp32
and bf16 autocast (fp16 at op level); its allocations; 2-process DDP; ``train_step.training_step``.
"""

import copy
import importlib
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from attention_utils import max_error
from torch.utils._python_dispatch import TorchDispatchMode

from adclr.fused_loss import FusedADCLRLoss, dino_cross_entropy
from adclr.heads import DINOHead, HeadFeatures
from adclr.kernels import dino_soft_cross_entropy_, dino_teacher_probs
from adclr.loss import ADCLRLoss
from adclr.model import ADCLRVisionTransformer, MultiCropWrapper

STUDENT_TEMP, TEACHER_TEMP, MOMENTUM = 0.1, 0.04, 0.9
pytest.importorskip("triton")  # a dependency on Linux; the Triton rows run on CUDA or in its interpreter
TRITON = importlib.import_module("adclr.kernels.triton_dino_loss")  # an import error here is a failure

# ---------------------------------------------------------------------------------------------------
# Row operations: both backends against float64
# ---------------------------------------------------------------------------------------------------

ROW_CASES = [  # (backend, logits dtype); bf16 is broken in the Triton interpreter
    ("torch", torch.float32),
    ("torch", torch.float16),
    ("torch", torch.bfloat16),
    ("torch", torch.float64),
    ("triton", torch.float32),
    ("triton", torch.float16),
]
if torch.cuda.is_available():
    ROW_CASES.append(("triton", torch.bfloat16))
ROW_IDS = [f"{b}-{str(d).split('.')[-1]}" for b, d in ROW_CASES]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Rounding of the gradient stored in the logits' dtype, relative to its largest value (one unit in the last place).
GRAD_TOL = {torch.float64: 1e-7, torch.float32: 1.2e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def strided_logits(R, K, dtype):
    """``[R, K]`` logits whose rows are ``K + 5`` apart (writes past K would show in the padding), all
    well below zero, so that a padding column read as 0 instead of masked would dominate a row."""
    base = (torch.randn(R, K + 5, device=DEVICE) * 3 - 12).to(dtype)
    return base, base[:, :K]


@pytest.mark.parametrize("backend, dtype", ROW_CASES, ids=ROW_IDS)
@pytest.mark.parametrize("K, max_block", [(1, 4096), (7, 4096), (300, 4096), (300, 64), (1000, 128)])
def test_teacher_probs_match_float64(backend, dtype, K, max_block, monkeypatch):
    monkeypatch.setattr(TRITON, "_MAX_BLOCK_K", max_block)  # small blocks: the online max/sum over K blocks
    base, logits = strided_logits(6, K, dtype)
    center = torch.randn(K, device=DEVICE)
    truth = torch.softmax((logits.double() - center.double()) / TEACHER_TEMP, dim=-1)
    pytorch = torch.softmax((logits.float() - center) / TEACHER_TEMP, dim=-1)  # the unfused loss's own
    out = torch.full((6, K), float("nan"), device=DEVICE)
    padding = base[:, K:].clone()
    dino_teacher_probs(logits, center, TEACHER_TEMP, out=out, backend=backend)
    assert max_error(out, truth) <= 2 * max_error(pytorch, truth) + 1e-7
    assert torch.equal(base[:, K:], padding)


@pytest.mark.parametrize("backend, dtype", ROW_CASES, ids=ROW_IDS)
@pytest.mark.parametrize("K, max_block", [(1, 4096), (7, 4096), (300, 4096), (300, 64), (1000, 128)])
def test_soft_cross_entropy_rows_match_float64(backend, dtype, K, max_block, monkeypatch):
    monkeypatch.setattr(TRITON, "_MAX_BLOCK_K", max_block)
    R = 9
    base, logits = strided_logits(R, K, dtype)
    probs = torch.softmax(torch.randn(3, K, device=DEVICE) * 3, dim=-1)
    targets = torch.cat([probs, probs[:1] + probs[1:2]])  # the last target sums two views (mass 2)
    index = torch.tensor([3, 0, 1, 2, 3, 3, 0, 2, 1], device=DEVICE)

    def loss_and_grad(dtype):
        s = (logits.to(dtype) / STUDENT_TEMP).requires_grad_()
        loss = -(targets.to(dtype)[index] * torch.log_softmax(s, dim=-1)).sum(-1)
        return loss.detach(), torch.autograd.grad(loss.sum(), s)[0]

    truth_loss, truth_grad = loss_and_grad(torch.float64)
    pytorch_loss, pytorch_grad = loss_and_grad(torch.float32)  # the unfused loss's own rounding
    loss = torch.full((R,), float("nan"), device=DEVICE)
    padding = base[:, K:].clone()
    dino_soft_cross_entropy_(logits, targets, index, STUDENT_TEMP, loss_out=loss, backend=backend)
    ulp = 1.2e-7 * truth_loss.abs().max().item()  # one fp32 unit in the last place at the largest loss
    assert max_error(loss, truth_loss) <= 2 * max_error(pytorch_loss, truth_loss) + ulp
    stored = GRAD_TOL[dtype] * truth_grad.abs().max().item()  # the gradient is written in the logits' dtype
    assert max_error(logits, truth_grad) <= 2 * max_error(pytorch_grad, truth_grad) + stored
    assert torch.equal(base[:, K:], padding)


def test_row_operations_reject_bad_input(monkeypatch):
    center = torch.zeros(8, device=DEVICE)
    logits, targets = torch.randn(4, 8, device=DEVICE), torch.rand(2, 8, device=DEVICE)
    index = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="backend must be one of"):
        dino_teacher_probs(logits, center, 0.1, backend="cuda")
    with pytest.raises(ValueError, match="center"):
        dino_teacher_probs(logits, center[:7], 0.1)
    with pytest.raises(ValueError, match="temp"):
        dino_teacher_probs(logits, center, 0.0)
    with pytest.raises(ValueError, match="unit-stride"):
        dino_teacher_probs(logits.T, center[:4], 0.1)
    with pytest.raises(ValueError, match="out must be a float32"):
        dino_teacher_probs(logits, center, 0.1, out=torch.empty(4, 8, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="targets must have K = 8"):
        dino_soft_cross_entropy_(logits, torch.rand(2, 9, device=DEVICE), index, 0.1)
    with pytest.raises(ValueError, match="targets must be float32"):
        dino_soft_cross_entropy_(logits, targets.double(), index, 0.1)
    with pytest.raises(ValueError, match="target_index"):
        dino_soft_cross_entropy_(logits, targets, index.float(), 0.1)
    with pytest.raises(ValueError, match="temp"):
        dino_soft_cross_entropy_(logits, targets, index, -1.0)
    with pytest.raises(TypeError, match="float64"):
        dino_soft_cross_entropy_(logits.double(), targets, index, 0.1, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        dino_teacher_probs(logits.cpu(), center.cpu(), 0.1, backend="triton")


# ---------------------------------------------------------------------------------------------------
# The chunked op on features, against float64
# ---------------------------------------------------------------------------------------------------


def float64_dino_cross_entropy(student, teacher, weight, teacher_weight, center):
    """DINO's multi-view loss written out from the logits, in float64."""
    s = student.double() @ weight.double().T
    t = teacher.double() @ teacher_weight.double().T
    p = torch.softmax((t - center.double()) / TEACHER_TEMP, dim=-1)
    log_q = torch.log_softmax(s / STUDENT_TEMP, dim=-1)
    pairs = [-(p[i] * log_q[v]).sum(-1).mean() for i in range(2) for v in range(s.shape[0]) if v != i]
    return torch.stack(pairs).mean()


def random_features(V, M, D, K):
    """Unit-norm features (as the heads give) and raw weights, on the kernels' device."""
    student = torch.nn.functional.normalize(torch.randn(V, M, D, device=DEVICE), dim=-1).requires_grad_()
    teacher = torch.nn.functional.normalize(torch.randn(2, M, D, device=DEVICE), dim=-1)
    weight = torch.randn(K, D, device=DEVICE).requires_grad_()
    return student, teacher, weight, torch.randn(K, D, device=DEVICE), torch.randn(K, device=DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("V, M, chunk_rows", [(2, 1, None), (2, 7, 3), (3, 5, 1), (6, 5, 13), (6, 4, None)])
def test_op_matches_float64(backend, V, M, chunk_rows):
    """Ragged last chunks, one-item chunks and no chunking; two views (no summed target) and more."""
    student, teacher, weight, teacher_weight, center = random_features(V, M, 8, 50)
    truth = float64_dino_cross_entropy(student, teacher, weight, teacher_weight, center)
    truth_grads = torch.autograd.grad(truth, (student, weight))
    loss = dino_cross_entropy(
        student,
        teacher,
        weight,
        teacher_weight,
        center,
        student_temp=STUDENT_TEMP,
        teacher_temp=TEACHER_TEMP,
        chunk_rows=chunk_rows,
        backend=backend,
    )
    grads = torch.autograd.grad(loss * 3.0, (student, weight))  # the backward scales by the incoming gradient
    assert loss.dtype == torch.float32 and max_error(loss, truth) <= 1e-5 * truth.abs().item()
    for ours, theirs in zip(grads, truth_grads):
        assert max_error(ours, 3.0 * theirs) <= 1e-5 * theirs.abs().max().item()


def unfused_dino_cross_entropy(student, teacher, weight, teacher_weight, center):
    """The unfused loss as ``ADCLRLoss`` runs it: logits in the autocast dtype, loss math in fp32."""
    s = (student @ weight.T).float()
    t = (teacher @ teacher_weight.T).float()
    p = torch.softmax((t - center) / TEACHER_TEMP, dim=-1)
    log_q = torch.log_softmax(s / STUDENT_TEMP, dim=-1)
    return torch.stack([-(p[i] * log_q[v]).sum(-1).mean() for i in (0, 1) for v in range(s.shape[0]) if v != i]).mean()


def assert_as_accurate_as_unfused(shape, dtype, backends, grad_scale=1.0):
    """Loss and gradients of the fused op under autocast ``dtype``: error vs float64 at most twice the
    unfused loss's in the same precision (``grad_scale``: that of a GradScaler, for fp16)."""
    student, teacher, weight, teacher_weight, center = random_features(*shape)
    inputs = (student, teacher, weight, teacher_weight, center)
    truth = float64_dino_cross_entropy(*inputs)
    truth_grads = torch.autograd.grad(truth, (student, weight))
    with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
        reference = unfused_dino_cross_entropy(*inputs)
    reference_grads = [g / grad_scale for g in torch.autograd.grad(reference * grad_scale, (student, weight))]
    for backend in backends:
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
            loss = dino_cross_entropy(
                *inputs, student_temp=STUDENT_TEMP, teacher_temp=TEACHER_TEMP, chunk_rows=5 * shape[0], backend=backend
            )
        grads = torch.autograd.grad(loss, (student, weight))
        for name, ours, theirs, t in zip(
            ("loss", "student", "weight"), (loss, *grads), (reference, *reference_grads), (truth, *truth_grads)
        ):
            bound = 2 * max_error(theirs, t) + 1e-6 * t.abs().max().item()
            assert max_error(ours, t) <= bound, f"{backend} {name}: {max_error(ours, t):.3e} > {bound:.3e}"


def test_op_under_fp16_autocast_is_as_accurate_as_the_gradscaled_reference():
    """fp16 logits and gradient matmuls, no scaler of its own: the unfused loss needs a GradScaler."""
    assert_as_accurate_as_unfused((4, 6, 16, 4096), torch.float16, ["auto"], grad_scale=2.0**16)


def test_op_at_the_paper_head_width_with_production_blocks():
    """K = 65536: the rows span 16 blocks of the launch configuration actually used (no monkeypatching)."""
    assert_as_accurate_as_unfused((3, 4, 32, 65536), torch.float32, ["triton", "torch"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_paper_head_size_both_row_backends(dtype):
    """ViT-S/16's head (bottleneck 256, K = 65536), 12 views of 16 images in chunks of 5 images, on the GPU."""
    assert_as_accurate_as_unfused((12, 16, 256, 65536), dtype, ["triton", "torch"])


def test_each_term_has_its_own_gradient_and_the_teacher_none():
    """``terms.cls`` and ``terms.query`` differentiate on their own, as ``ADCLRLoss``'s do."""
    C, B, Q, D, K = 4, 3, 2, 8, 40
    s_cls = torch.nn.functional.normalize(torch.randn(C * B, D), dim=-1).requires_grad_()
    s_q = torch.nn.functional.normalize(torch.randn(2, B, Q, D), dim=-1).requires_grad_()
    t_cls = torch.randn(2 * B, D).requires_grad_()  # a teacher that could take gradients must get none
    t_q = torch.randn(2, B, Q, D).requires_grad_()
    w, w_query, w_teacher = (torch.randn(K, D).requires_grad_() for _ in range(3))
    student, teacher = HeadFeatures(s_cls, s_q, w, w_query), HeadFeatures(t_cls, t_q, w_teacher, w_teacher)
    fused = FusedADCLRLoss(K, C)(student, teacher, TEACHER_TEMP)
    ref = ADCLRLoss(K, C)(s_cls @ w.T, t_cls @ w_teacher.T, s_q @ w_query.T, t_q @ w_teacher.T, TEACHER_TEMP)
    inputs = (s_cls, s_q, w, w_query)
    for ours, theirs in ((fused.cls, ref.cls), (fused.query, ref.query)):
        mine = torch.autograd.grad(ours, inputs, retain_graph=True, allow_unused=True)
        reference = torch.autograd.grad(theirs, inputs, retain_graph=True, allow_unused=True)
        for a, b in zip(mine, reference):
            assert (a is None) == (b is None)
            if a is not None:
                assert max_error(a, b) <= 1e-5 * b.abs().max().item()
    fused.total.backward()
    assert t_cls.grad is None and t_q.grad is None and w_teacher.grad is None


def test_lambda_zero_leaves_the_query_features_without_gradient():
    C, B, Q, D, K = 3, 2, 2, 8, 16
    s_q = torch.randn(2, B, Q, D).requires_grad_()
    w = torch.randn(K, D)
    student = HeadFeatures(torch.randn(C * B, D).requires_grad_(), s_q, w, w)
    teacher = HeadFeatures(torch.randn(2 * B, D), torch.randn(2, B, Q, D), w, w)
    loss_fn = FusedADCLRLoss(K, C, lambda_query=0.0)
    terms = loss_fn(student, teacher, TEACHER_TEMP)
    terms.total.backward()
    assert s_q.grad is None and torch.equal(terms.total, terms.cls) and terms.query.item() == 0
    assert loss_fn.query_center.abs().sum() > 0  # the query centre still follows the teacher, as unfused


def test_fused_loss_rejects_bad_input():
    w = torch.randn(16, 8)
    good = HeadFeatures(torch.randn(6, 8), None, w, None)
    teacher = HeadFeatures(torch.randn(4, 8), None, w, None)
    with pytest.raises(TypeError, match="HeadFeatures"):
        FusedADCLRLoss(16, 3)(torch.randn(6, 16), teacher, 0.04)
    with pytest.raises(ValueError, match="not a multiple of num_crops"):
        FusedADCLRLoss(16, 4)(good, teacher, 0.04)
    with pytest.raises(ValueError, match="out_dim"):
        FusedADCLRLoss(32, 3)(good, teacher, 0.04)
    with pytest.raises(ValueError, match="2 global crops"):
        FusedADCLRLoss(16, 3)(good, HeadFeatures(torch.randn(6, 8), None, w, None), 0.04)
    with pytest.raises(ValueError, match="both have query features"):
        FusedADCLRLoss(16, 3)(good, HeadFeatures(torch.randn(4, 8), torch.randn(2, 2, 1, 8), w, w), 0.04)
    with pytest.raises(ValueError, match="teacher_temp"):
        FusedADCLRLoss(16, 3)(good, teacher, 0.0)
    with pytest.raises(ValueError, match="chunk_rows"):
        FusedADCLRLoss(16, 3, chunk_rows=0)(good, teacher, 0.04)
    with pytest.raises(ValueError, match="backend"):
        FusedADCLRLoss(16, 3, backend="cuda")
    with pytest.raises(ValueError, match="num_crops"):
        FusedADCLRLoss(16, 1)


# ---------------------------------------------------------------------------------------------------
# Memory: no tensor of the fused loss is [all tokens, K]
# ---------------------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements any op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_fused_loss_allocates_only_chunk_sized_tensors():
    """The PyTorch rows (the Triton launchers allocate only the [rows] losses besides; the interpreter's
    host copies of whole argument buffers would blur this measurement)."""
    C, B, Q, D, K, chunk_rows = 6, 4, 10, 4, 512, 6
    N = C * B + 2 * B * Q  # student tokens through the head: 104
    features = torch.nn.functional.normalize(torch.randn(N, D), dim=-1).requires_grad_()
    teacher = torch.nn.functional.normalize(torch.randn(2 * B + 2 * B * Q, D), dim=-1)
    w = torch.randn(K, D).requires_grad_()
    w_teacher = torch.randn(K, D)

    def split(x, crops):
        return x[: crops * B], x[crops * B :].view(2, B, Q, -1)

    loss_fn = FusedADCLRLoss(K, C, chunk_rows=chunk_rows, backend="torch")
    with LargestTensor() as fused:
        terms = loss_fn(
            HeadFeatures(*split(features, C), w, w), HeadFeatures(*split(teacher, 2), w_teacher, w_teacher), 0.04
        )
        terms.total.backward()
    bound = max(chunk_rows * K, K * D)  # one chunk of logits; the last layer's weight and its gradient
    assert fused.numel <= bound < N * K // 8, (fused.numel, bound)

    with LargestTensor() as unfused:  # the same measurement sees the unfused loss's [N, K] logits
        logits = features @ w.T
        t_logits = teacher @ w_teacher.T
        (s_cls, s_q), (t_cls, t_q) = split(logits, C), split(t_logits, 2)
        ADCLRLoss(K, C)(s_cls, t_cls, s_q, t_q, 0.04).total.backward()
    assert unfused.numel >= N * K


# ---------------------------------------------------------------------------------------------------
# The whole head + loss on a tiny ADCLR model: fused, unfused and float64
# ---------------------------------------------------------------------------------------------------

OUT_DIM, HIDDEN, BOTTLENECK, EMBED = 96, 48, 16, 32


def make_network(separate_query_head, norm_last_layer):
    backbone = ADCLRVisionTransformer(
        patch_size=8, img_size=32, embed_dim=EMBED, depth=2, num_heads=2, attn_backend="sdpa"
    )

    def head():
        h = DINOHead(EMBED, OUT_DIM, HIDDEN, BOTTLENECK, norm_last_layer=norm_last_layer)
        if not norm_last_layer:  # a trainable magnitude away from 1, so its gradient is not trivial
            h.last_layer.parametrizations.weight.original0.data.uniform_(0.5, 2.0)
        return h

    return MultiCropWrapper(backbone, head(), head() if separate_query_head else None)


def make_batch(num_crops, B, Q):
    """Distinct random global and local views, and query crops when Q > 0."""
    crops = [torch.randn(B, 3, 32, 32) for _ in range(2)] + [torch.randn(B, 3, 16, 16) for _ in range(num_crops - 2)]
    return crops, torch.randn(B, Q, 3, 8, 8) if Q else None


def make_loss(fused, num_crops, centers, **options):
    loss_fn = FusedADCLRLoss(OUT_DIM, num_crops, **options) if fused else ADCLRLoss(OUT_DIM, num_crops)
    loss_fn.to(centers[0].device)
    loss_fn.center.copy_(centers[0])
    loss_fn.query_center.copy_(centers[1])
    return loss_fn


def loss_step(student, teacher, loss_fn, crops, query_crops, dtype):
    """One forward/backward as ``training_step`` runs it: (cls, query, total, centre, query centre), grads."""
    student.zero_grad(set_to_none=True)
    with torch.autocast(crops[0].device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16)):
        if isinstance(loss_fn, FusedADCLRLoss):
            with torch.no_grad():
                teacher_features = teacher(crops[:2], query_crops, head_features=True)
            terms = loss_fn(student(crops, query_crops, head_features=True), teacher_features, TEACHER_TEMP)
        else:
            with torch.no_grad():
                t_cls, t_q = teacher(crops[:2], query_crops)
            terms = loss_fn(*_interleave(student(crops, query_crops), (t_cls, t_q)), TEACHER_TEMP)
    terms.total.backward()
    values = [terms.cls, terms.query, terms.total, loss_fn.center, loss_fn.query_center]
    grads = {name: p.grad for name, p in student.named_parameters() if p.grad is not None}
    return [v.detach().clone() for v in values], grads


def _interleave(student_out, teacher_out):
    return student_out[0], teacher_out[0], student_out[1], teacher_out[1]


def float64_step(student, teacher, crops, query_crops, num_crops, centers):
    """The same step in float64, with the loss written out from its definition (paper Eq. 6)."""
    student, teacher = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    crops = [c.double() for c in crops]
    query_crops = query_crops.double() if query_crops is not None else None
    with torch.no_grad():
        t_cls, t_q = teacher(crops[:2], query_crops)
    s_cls, s_q = student(crops, query_crops)
    center, query_center = (c.double() for c in centers)

    def h(t, c, s):
        p = torch.softmax((t - c) / TEACHER_TEMP, dim=-1)
        return -(p * torch.log_softmax(s / STUDENT_TEMP, dim=-1)).sum(-1).mean()

    s_views, t_views = s_cls.chunk(num_crops), t_cls.chunk(2)
    cls = torch.stack([h(t_views[i], center, s_views[v]) for i in range(2) for v in range(num_crops) if v != i]).mean()
    query = (h(t_q[1], query_center, s_q[0]) + h(t_q[0], query_center, s_q[1])) / 2 if s_q is not None else 0 * cls
    total = cls + 0.5 * query
    total.backward()
    new_center = MOMENTUM * center + (1 - MOMENTUM) * t_cls.mean(0)
    new_query_center = query_center
    if t_q is not None:
        new_query_center = MOMENTUM * query_center + (1 - MOMENTUM) * t_q.flatten(0, 2).mean(0)
    grads = {name: p.grad for name, p in student.named_parameters() if p.grad is not None}
    return [cls.detach(), query.detach(), total.detach(), new_center, new_query_center], grads


# Relative to each quantity's size; bf16: half a unit in its last place (one rounding of the result itself).
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 2**-9}
# fp32 only: whatever the unfused loss does, the fused one stays this close to float64 (relative to each
# quantity's size), so a bug both share (say in the centre update) still fails. bf16 gradients deep in
# the ViT are several percent off float64 for both losses: there the bound is what bf16 rounding causes.
ABSOLUTE = {torch.float32: 1e-4, torch.bfloat16: float("inf")}
ROUNDINGS = 8  # other bf16 roundings of the unfused step that measure its rounding error (see bf16_rounding_error)


def _names(values, grads):
    return dict(zip(["cls", "query", "total", "center", "query_center"], values)) | grads


def bf16_rounding_error(student, teacher, crops, query_crops, num_crops, centers, samples=ROUNDINGS):
    """The largest error vs float64, per quantity, of the unfused step under bf16 autocast over ``samples``
    copies of the step whose weights, inputs and centres are each moved by less than half a bf16 step
    (a relative 2**-9): equally valid inputs that bf16 rounds differently. One rounding's error can be
    small by chance (a gradient with cancellations: a norm weight's); the largest of several is what bf16
    rounding causes for that quantity, whatever the loss (a change both losses share moves it alike)."""
    generator = torch.Generator().manual_seed(0)

    def jitter(t):
        noise = torch.rand(t.shape, generator=generator, dtype=t.dtype).to(t.device)
        return t * (1 + 2**-9 * (2 * noise - 1))

    worst = {}
    for _ in range(samples):
        s, t = copy.deepcopy(student), copy.deepcopy(teacher)
        with torch.no_grad():
            for p in [*s.parameters(), *t.parameters()]:
                p.copy_(jitter(p))
        c, q = [jitter(x) for x in crops], jitter(query_crops) if query_crops is not None else None
        moved = tuple(jitter(x) for x in centers)
        truth = _names(*float64_step(s, t, c, q, num_crops, moved))
        bf16 = _names(*loss_step(s, t, make_loss(False, num_crops, moved), c, q, torch.bfloat16))
        for name in truth:
            worst[name] = max(worst.get(name, 0.0), max_error(bf16[name], truth[name]))
    return worst


def compare_with_unfused(num_crops, Q, separate, norm_last_layer, dtype, device="cpu", **options):
    """Fused and unfused from the same weights and batch; the fused one's error vs float64 must be at
    most twice the unfused one's (plus ``FLOOR`` of each quantity's size). Under
    bf16 the unfused error is the largest over this step and ``ROUNDINGS`` other roundings of it."""
    torch.manual_seed(1000 * num_crops + Q)
    student = make_network(separate, norm_last_layer).to(device)
    teacher = make_network(separate, norm_last_layer).requires_grad_(False).to(device)  # its own random weights
    crops, query_crops = make_batch(num_crops, 3, Q)
    crops = [c.to(device) for c in crops]
    query_crops = query_crops.to(device) if query_crops is not None else None
    centers = (torch.randn(1, OUT_DIM, device=device) * 0.3, torch.randn(1, OUT_DIM, device=device) * 0.3)
    truth = _names(*float64_step(student, teacher, crops, query_crops, num_crops, centers))
    ref = _names(*loss_step(student, teacher, make_loss(False, num_crops, centers), crops, query_crops, dtype))
    ours = _names(
        *loss_step(student, teacher, make_loss(True, num_crops, centers, **options), crops, query_crops, dtype)
    )
    assert set(ours) == set(ref) == set(truth)
    magnitudes = "last_layer.parametrizations.weight.original0"
    assert (magnitudes in " ".join(ours)) == (not norm_last_layer)
    unfused = {name: max_error(ref[name], truth[name]) for name in truth}
    if dtype == torch.bfloat16:
        rounding = bf16_rounding_error(student, teacher, crops, query_crops, num_crops, centers)
        unfused = {name: max(unfused[name], rounding[name]) for name in truth}
    for name, t in truth.items():
        size = max(t.abs().max().item(), 1e-3)
        bound = min(2 * unfused[name] + FLOOR[dtype] * size, ABSOLUTE[dtype] * size)
        error = max_error(ours[name], t)
        assert error <= bound, f"{name}: {error:.3e} > {bound:.3e} (unfused {unfused[name]:.3e})"


@pytest.mark.parametrize("separate", [False, True], ids=["shared_head", "separate_head"])
@pytest.mark.parametrize("num_crops", [2, 4, 6])
@pytest.mark.parametrize("Q", [0, 1, 10])
def test_model_fp32_matches_unfused(Q, num_crops, separate):
    """Chunks of one image (CLS) and ragged (query): chunk_rows = 2 x crops - 1."""
    norm_last_layer = num_crops != 4  # crops == 4: trainable weight-norm magnitude
    compare_with_unfused(num_crops, Q, separate, norm_last_layer, torch.float32, chunk_rows=2 * num_crops - 1)


@pytest.mark.parametrize("separate", [False, True], ids=["shared_head", "separate_head"])
@pytest.mark.parametrize("num_crops, Q", [(2, 10), (6, 0), (6, 1)])
def test_model_bf16_autocast_matches_unfused(num_crops, Q, separate):
    compare_with_unfused(num_crops, Q, separate, separate, torch.bfloat16, chunk_rows=2 * num_crops - 1)


def test_model_default_chunks_and_triton_rows_match_unfused():
    compare_with_unfused(4, 10, True, False, torch.float32)  # one chunk per term
    compare_with_unfused(4, 3, False, True, torch.float32, DEVICE, chunk_rows=5, backend="triton")


@pytest.mark.parametrize("separate", [False, True])
def test_head_features_are_the_logits_before_the_last_layer(separate):
    model = make_network(separate, norm_last_layer=False)
    crops, query_crops = make_batch(4, 2, 3)
    cls_logits, query_logits = model(crops, query_crops)
    features = model(crops, query_crops, head_features=True)
    assert features.cls.shape == (8, BOTTLENECK) and features.queries.shape == (2, 2, 3, BOTTLENECK)
    assert (features.query_weight is features.weight) == (not separate)
    assert max_error(features.cls @ features.weight.T, cls_logits) <= 1e-5
    assert max_error(features.queries @ features.query_weight.T, query_logits) <= 1e-5
    no_queries = model(crops, None, head_features=True)
    assert no_queries.queries is None and no_queries.query_weight is None


# ---------------------------------------------------------------------------------------------------
# Two processes (gloo DDP) and the trainer's own step
# ---------------------------------------------------------------------------------------------------


def _ddp_worker(rank, port, result_dir):
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    results = {}
    for separate in (False, True):
        torch.manual_seed(0)  # the same weights and centres on both ranks
        student = make_network(separate, norm_last_layer=False)
        teacher = make_network(separate, norm_last_layer=False).requires_grad_(False)
        centers = (torch.randn(1, OUT_DIM) * 0.3, torch.randn(1, OUT_DIM) * 0.3)
        torch.manual_seed(1 + rank)  # each rank its own batch
        crops, query_crops = make_batch(4, 2, 3)
        for fused in (False, True):
            model = copy.deepcopy(student)
            ddp = DistributedDataParallel(model)
            loss_fn = make_loss(fused, 4, centers, chunk_rows=5) if fused else make_loss(False, 4, centers)
            values, _ = loss_step(ddp, teacher, loss_fn, crops, query_crops, torch.float32)
            grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
            results[separate, fused] = values, grads
    torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_matches_unfused_with_all_reduced_centres(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for separate in (False, True):
        for rank in ranks:
            (ref_values, ref_grads), (values, grads) = rank[separate, False], rank[separate, True]
            assert set(grads) == set(ref_grads) and len(grads) > 0
            for a, b in [*zip(values, ref_values), *((grads[n], ref_grads[n]) for n in ref_grads)]:
                assert max_error(a, b) <= 1e-5 * max(b.abs().max().item(), 1e-3)
        (values0, grads0), (values1, grads1) = ranks[0][separate, True], ranks[1][separate, True]
        assert not torch.equal(values0[0], values1[0])  # each rank's own loss ...
        assert torch.equal(values0[3], values1[3]) and torch.equal(values0[4], values1[4])  # ... one centre
        assert all(torch.equal(grads0[n], grads1[n]) for n in grads0)  # DDP averaged the gradients


def test_training_step_fused_matches_unfused():
    """``train_step.training_step`` (autocast, clipping, AdamW, EMA) with either loss: same terms and gradients."""
    from engine_utils import SETTINGS, batch, tiny_config

    from adclr import train_step

    results = []
    for fused in (False, True):
        config = tiny_config(out_dim=OUT_DIM, num_query=3, local_crops_number=2, fused_loss=fused)
        state = train_step.build_train_state(config, torch.device("cpu"))
        assert isinstance(state.loss, FusedADCLRLoss if fused else ADCLRLoss)
        torch.manual_seed(0)
        crops, query_crops = batch(config)
        losses = train_step.training_step(state, crops, query_crops, SETTINGS)
        grads = {n: p.grad for n, p in state.student.named_parameters() if p.grad is not None}
        results.append((losses, grads, state.loss.center.clone()))
    (ref, ref_grads, ref_center), (ours, grads, center) = results
    assert set(grads) == set(ref_grads) and len(grads) > 0
    for a, b in ((ours.cls, ref.cls), (ours.query, ref.query), (ours.loss, ref.loss)):
        assert abs(a - b) <= 1e-5 * max(abs(b), 1e-3)
    for a, b in ((center, ref_center), *((grads[n], ref_grads[n]) for n in ref_grads)):
        assert max_error(a, b) <= 1e-5 * max(b.abs().max().item(), 1e-3)
