"""The ADCLR objective (paper Eq. 6): DINO's CLS loss plus lambda/Q x the DINO loss of the query tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import field_default


@dataclass
class TeacherEntropy:
    """What DINO users watch for collapse, over a batch of the teacher's centred, sharpened outputs:
    ``mean`` is the mean per-row entropy (near ln K: every output uniform), ``of_mean`` the entropy of
    the batch-mean output (near 0: every row picks the same dimension). A healthy teacher has a low
    ``mean`` and a high ``of_mean``. Both in nats, 0-d fp32 tensors."""

    mean: torch.Tensor
    of_mean: torch.Tensor


class TeacherEntropyAccumulator:
    """``TeacherEntropy`` of probability rows seen a chunk at a time (the fused loss never holds them all)."""

    def __init__(self, num_outputs: int, device: torch.device):
        self.entropy_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.prob_sum = torch.zeros(num_outputs, dtype=torch.float32, device=device)
        self.rows = 0

    @torch.no_grad()
    def add(self, probs: torch.Tensor) -> None:
        """Take ``probs [rows, K]`` (rows summing to 1) into the sums."""
        probs = probs.float()
        self.entropy_sum -= torch.special.xlogy(probs, probs).sum()
        self.prob_sum += probs.sum(0)
        self.rows += probs.shape[0]

    def result(self) -> TeacherEntropy:
        mean_probs = self.prob_sum / max(self.rows, 1)
        return TeacherEntropy(self.entropy_sum / max(self.rows, 1), -torch.special.xlogy(mean_probs, mean_probs).sum())


def teacher_entropy(probs: torch.Tensor) -> TeacherEntropy:
    """``TeacherEntropy`` of probability rows ``[..., K]``."""
    accumulator = TeacherEntropyAccumulator(probs.shape[-1], probs.device)
    accumulator.add(probs.reshape(-1, probs.shape[-1]))
    return accumulator.result()


@dataclass
class LossTerms:
    """The loss and its two terms, plus the teacher's entropies per branch (``query_entropy`` is None
    without a query loss)."""

    total: torch.Tensor
    cls: torch.Tensor
    query: torch.Tensor
    cls_entropy: TeacherEntropy | None = None
    query_entropy: TeacherEntropy | None = None


def _cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """H(teacher, student) = -sum p_t log p_s over the last dim, averaged over everything else."""
    return torch.sum(-teacher_probs * F.log_softmax(student_logits / student_temp, dim=-1), dim=-1).mean()


class CentredLoss(nn.Module):
    """What both forms of the ADCLR loss (``ADCLRLoss``, ``adclr.fused_loss.FusedADCLRLoss``) hold: the crop
    count, the student temperature, lambda, and the teacher's two centres (CLS and query), so that a
    checkpoint's loss state loads into either."""

    def __init__(
        self,
        out_dim: int,
        num_crops: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        lambda_query: float = field_default("lambda_query"),  # the run config's default: the paper's 0.5
    ):
        super().__init__()
        if num_crops < 2:
            raise ValueError(f"num_crops must be >= 2 (two global views), got {num_crops}")
        self.out_dim = out_dim
        self.num_crops = num_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.lambda_query = lambda_query
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("query_center", torch.zeros(1, out_dim))

    def has_query_term(self, student_queries: torch.Tensor | None) -> bool:
        """The query term is computed when the student has query outputs and lambda is not 0."""
        return student_queries is not None and self.lambda_query != 0


class ADCLRLoss(CentredLoss):
    """DINO's multi-crop CLS loss plus the query-token loss, each with its own centre.

    CLS: the teacher sees the two global views, the student every crop; pairs where both see the same
    view are skipped. Queries: ``H(teacher query i in view B, student query i in view A)`` for
    ``(A, B) = (1, 2)`` and ``(2, 1)``, averaged over the Q queries (the ``1/Q``) and the two pairs.
    Teacher outputs are centred (EMA of their batch mean, all-reduced across processes) and sharpened
    with the teacher temperature the caller passes in (it follows a warm-up schedule).
    """

    def forward(self, student_cls, teacher_cls, student_query, teacher_query, teacher_temp: float) -> LossTerms:
        """``*_cls``: ``[crops*B, K]`` (teacher: 2 global crops); ``*_query``: ``[2, B, Q, K]`` or None."""
        student_views = student_cls.float().chunk(self.num_crops)
        teacher_probs = F.softmax((teacher_cls.float() - self.center) / teacher_temp, dim=-1).detach().chunk(2)
        pairs = [
            _cross_entropy(t, student_views[v], self.student_temp)
            for i, t in enumerate(teacher_probs)
            for v in range(self.num_crops)
            if v != i
        ]
        cls_loss = torch.stack(pairs).mean()

        query_loss, query_entropy = cls_loss.new_zeros(()), None
        if self.has_query_term(student_query):
            tq = F.softmax((teacher_query.float() - self.query_center) / teacher_temp, dim=-1).detach()
            sq = student_query.float()
            query_loss = 0.5 * (
                _cross_entropy(tq[1], sq[0], self.student_temp) + _cross_entropy(tq[0], sq[1], self.student_temp)
            )
            query_entropy = teacher_entropy(tq)
        self.update_centers(teacher_cls, teacher_query)
        return LossTerms(
            total=cls_loss + self.lambda_query * query_loss,
            cls=cls_loss,
            query=query_loss,
            cls_entropy=teacher_entropy(torch.cat(teacher_probs)),
            query_entropy=query_entropy,
        )

    @torch.no_grad()
    def update_centers(self, teacher_cls: torch.Tensor, teacher_query: torch.Tensor | None) -> None:
        """center <- m * center + (1 - m) * mean of the teacher outputs over every process."""
        ema_center_(self.center, teacher_cls.detach().float().sum(dim=0), teacher_cls.shape[0], self.center_momentum)
        if teacher_query is not None:
            rows = teacher_query.flatten(0, -2)
            ema_center_(self.query_center, rows.detach().float().sum(dim=0), rows.shape[0], self.center_momentum)


@torch.no_grad()
def ema_center_(center: torch.Tensor, column_sum: torch.Tensor, rows: int, momentum: float) -> None:
    """``center <- momentum * center + (1 - momentum) * column_sum / rows``, sum and rows all-reduced."""
    total = column_sum.float().reshape(center.shape).clone()
    count = torch.tensor([rows], dtype=torch.float32, device=total.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    center.mul_(momentum).add_(total / count, alpha=1 - momentum)


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
