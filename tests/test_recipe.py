"""The rest of DINO's recipe, against its published formulas: the paper preset's values, the per-iteration
schedules (learning rate, weight decay, teacher momentum and temperature, last-layer freezing) and the
weight-decay parameter groups.

The schedules are written out here one iteration at a time. Two deliberate differences from DINO's code
are pinned down and bounded rather than hidden: the linear warm-ups here end one step later (the warm-up
excludes its end point, so the peak is reached at the first iteration after the warm-up; DINO's
``np.linspace`` includes it), and the teacher temperature rises every iteration instead of once per epoch.
"""

import math

import pytest
from engine_utils import CPU, tiny_config

from adclr import train_step
from adclr.config import make_config
from adclr.schedules import build_schedules

# The paper's ViT-S/16 recipe (Section B and Section 4.3) and DINO's defaults that it keeps.
PAPER = dict(
    arch="vit_small",
    patch_size=16,
    out_dim=65536,
    norm_last_layer=True,
    drop_path_rate=0.1,
    global_size=224,
    global_crops_scale=(0.4, 1.0),
    local_size=96,
    local_crops_number=10,
    local_crops_scale=(0.05, 0.4),  # DINO's (Section 4.3's "(0.05, s)" for local and query crops leaves s open)
    num_query=10,  # "we set Q = 10 by default"
    query_scale=(0.05, 0.15),  # "query crop ratio from 0.05 to 0.15"
    lambda_query=0.5,  # "we set lambda = 0.5"
    query_keys="prefix+raw",  # Eq. 5: query tokens attend to CLS and the raw patches
    bidirectional=False,
    lr=0.0005,  # at a total batch of 256, linearly scaled
    min_lr=1e-6,
    warmup_epochs=10,
    weight_decay=0.04,
    weight_decay_end=0.4,
    warmup_teacher_temp=0.04,
    teacher_temp=0.07,
    warmup_teacher_temp_epochs=30,
    momentum_teacher=0.996,
    clip_grad=3.0,
    freeze_last_layer=1,
)


def test_data_path_selects_the_papers_recipe():
    flat = make_config(data_path="/data/imagenet/train").flat()
    assert {name: flat[name] for name in PAPER} == PAPER
    assert make_config().preset == "builtin" and make_config(data_path="/data").preset == "paper"


def test_loss_temperature_centre_momentum_and_crop_count():
    """Student temperature 0.1 (paper Section B), centre momentum 0.9 (DINO), every crop counted."""
    config = tiny_config(local_crops_number=3, lambda_query=0.7)
    loss = train_step.build_train_state(config, CPU).loss
    assert (loss.student_temp, loss.center_momentum, loss.num_crops, loss.lambda_query) == (0.1, 0.9, 5, 0.7)


def cosine(base: float, final: float, total: int, warmup: int, it: int) -> float:
    """Linear warm-up from 0 (peak at iteration ``warmup``), then half a cosine from ``base`` towards ``final``."""
    if it < warmup:
        return base * it / warmup
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (it - warmup) / (total - warmup)))


def dino_cosine(base: float, final: float, total: int, warmup: int, it: int) -> float:
    """DINO's ``utils.cosine_scheduler``: the same, with the warm-up's end point included."""
    return base * it / (warmup - 1) if it < warmup else cosine(base, final, total, warmup, it)


EPOCHS, ITERS, WORLD = 40, 3, 4


@pytest.fixture(scope="module")
def schedules():
    config = make_config("paper", epochs=EPOCHS, batch_size_per_gpu=32, freeze_last_layer=2)
    return build_schedules(config, iters_per_epoch=ITERS, world_size=WORLD)


def test_learning_rate_warms_up_then_follows_a_cosine(schedules):
    total, warmup = EPOCHS * ITERS, PAPER["warmup_epochs"] * ITERS
    peak = PAPER["lr"] * 32 * WORLD / 256  # the linear scaling rule on the total batch
    expected = [cosine(peak, PAPER["min_lr"], total, warmup, it) for it in range(total)]
    assert schedules.lr.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    dino = [dino_cosine(peak, PAPER["min_lr"], total, warmup, it) for it in range(total)]
    assert max(abs(a - b) for a, b in zip(expected, dino)) <= peak / (warmup - 1)  # one warm-up step
    assert [schedules.at(it).lr for it in (0, warmup, total - 1)] == pytest.approx([0.0, peak, expected[-1]])


def test_weight_decay_and_teacher_momentum_follow_cosines(schedules):
    total = EPOCHS * ITERS
    wd = [cosine(PAPER["weight_decay"], PAPER["weight_decay_end"], total, 0, it) for it in range(total)]
    momentum = [cosine(PAPER["momentum_teacher"], 1.0, total, 0, it) for it in range(total)]
    assert schedules.weight_decay.tolist() == pytest.approx(wd, rel=1e-12)
    assert schedules.momentum.tolist() == pytest.approx(momentum, rel=1e-12)
    assert schedules.at(0).momentum == PAPER["momentum_teacher"] and 0.99999 < schedules.at(total - 1).momentum < 1


def test_teacher_temperature_warms_up_linearly_then_stays(schedules):
    warmup_iters = PAPER["warmup_teacher_temp_epochs"] * ITERS
    start, end = PAPER["warmup_teacher_temp"], PAPER["teacher_temp"]
    expected = [start + (end - start) * min(it / warmup_iters, 1.0) for it in range(EPOCHS * ITERS)]
    assert schedules.teacher_temp.tolist() == pytest.approx(expected, rel=1e-12)
    # DINO raises it once per epoch and reaches the end value one epoch earlier: within one epoch's rise.
    epochs = PAPER["warmup_teacher_temp_epochs"]
    dino = [start + (end - start) * min((it // ITERS) / (epochs - 1), 1.0) for it in range(EPOCHS * ITERS)]
    assert max(abs(a - b) for a, b in zip(expected, dino)) <= (end - start) / (epochs - 1)
    assert schedules.at(0).teacher_temp == start and schedules.at(warmup_iters).teacher_temp == end


def test_last_layer_is_frozen_for_the_first_epochs_only(schedules):
    frozen = [schedules.at(it).freeze_last_layer for it in range(EPOCHS * ITERS)]
    assert frozen == [it < 2 * ITERS for it in range(EPOCHS * ITERS)]


@pytest.mark.parametrize("separate_query_head", [False, True])
def test_weight_decay_groups_exclude_biases_and_norms(separate_query_head):
    """DINO's groups: biases and LayerNorm parameters get no weight decay; weight matrices, the CLS token,
    the position embedding and a trainable weight-norm magnitude do; frozen parameters are in no group."""
    state = train_step.build_train_state(
        tiny_config(separate_query_head=separate_query_head, norm_last_layer=False), CPU
    )
    decay, no_decay = state.optimizer.param_groups
    assert no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in state.student.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    trainable = {n for n, p in state.student.named_parameters() if p.requires_grad}
    assert decayed | not_decayed == trainable and not decayed & not_decayed
    assert not_decayed == {n for n in trainable if n.endswith(".bias") or ".norm" in n}
    assert {"backbone.cls_token", "backbone.pos_embed", "head.last_layer.parametrizations.weight.original0"} <= decayed
    assert any(n.startswith("query_head.") for n in decayed) == separate_query_head
