"""A real optimisation: a tiny ADCLR student/teacher pair trained for 30 steps on one fixed batch."""

import copy

import torch

from adclr.heads import DINOHead
from adclr.loss import ADCLRLoss
from adclr.model import ADCLRVisionTransformer, MultiCropWrapper


def test_thirty_steps_lower_the_total_loss():
    backbone = ADCLRVisionTransformer(
        patch_size=8, img_size=32, embed_dim=32, depth=2, num_heads=2, attn_backend="sdpa"
    )
    student = MultiCropWrapper(backbone, DINOHead(32, out_dim=64, hidden_dim=64, bottleneck_dim=16))
    teacher = copy.deepcopy(student).requires_grad_(False)
    loss_fn = ADCLRLoss(out_dim=64, num_crops=4)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    crops = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    query_crops = torch.randn(8, 4, 3, 8, 8)

    losses = []
    for _ in range(30):
        with torch.no_grad():
            t_cls, t_q = teacher(crops[:2], query_crops)
        s_cls, s_q = student(crops, query_crops)
        terms = loss_fn(s_cls, t_cls, s_q, t_q, teacher_temp=0.04)
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
        with torch.no_grad():
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(0.9).add_(ps.detach(), alpha=0.1)
        losses.append(terms.total.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses
