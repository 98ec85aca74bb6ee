"""A tiny end-to-end run through the trainer's own ``train_step.training_step``: the query branch learns.

Twelve steps on one fixed batch, twice from the same initialisation: ADCLR (Q = 4 query crops,
lambda = 0.5, a separate query head) and plain DINO (no query crops). In the ADCLR run the query loss
falls; and the two runs' patch features end up apart. Query tokens never influence the CLS and patch
tokens in the forward pass and, with a separate query head, the CLS logits do not depend on the query
loss either: the query loss can move the patch features only through its gradient into the backbone.
Were that gradient lost (the query term dropped from the total, the query features detached), both
runs would produce the same patch features up to rounding.
"""

import math

import torch
from engine_utils import CPU, batch, tiny_config

from adclr import train_step
from adclr.schedules import StepSettings

SETTINGS = StepSettings(lr=1e-3, weight_decay=0.01, teacher_temp=0.04, momentum=0.9, freeze_last_layer=False)
STEPS = 12


def _train(num_query: int, held_out: torch.Tensor):
    """Losses of every step, and the student's patch features of ``held_out`` before and after training."""
    config = tiny_config(
        out_dim=64, head_hidden_dim=64, head_bottleneck_dim=16, num_query=num_query, separate_query_head=True
    )
    state = train_step.build_train_state(config, CPU)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        crops, query_crops = batch(config)
    with torch.no_grad():
        before = state.student.backbone(held_out).patches
    query_crops = query_crops if num_query else None
    losses = [train_step.training_step(state, crops, query_crops, SETTINGS) for _ in range(STEPS)]
    with torch.no_grad():
        after = state.student.backbone(held_out).patches
    return losses, before, after


def test_query_loss_falls_and_changes_the_patch_features():
    held_out = torch.randn(4, 3, 32, 32)
    adclr, before, after = _train(4, held_out)
    dino, before_again, after_dino = _train(0, held_out)
    assert torch.equal(before, before_again)  # the same initialisation
    values = [v for step in adclr + dino for v in (step.loss, step.cls, step.query)]
    assert all(isinstance(v, float) and math.isfinite(v) for v in values)

    query = [step.query for step in adclr]
    assert sum(query[-3:]) / 3 < 0.25 * query[0], query

    moved = (after_dino - before).norm()
    assert moved > 0.05 * before.norm()  # DINO alone moves the patch features
    assert (after - after_dino).norm() > 0.05 * moved  # and the query loss moves them elsewhere
