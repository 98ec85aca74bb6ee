"""The teacher as ``adclr.train_step`` builds and updates it: no stochastic depth, no autograd graph, an EMA of
every parameter, and the evaluation's eval mode.

DINO's teacher has no drop-path (``drop_path_rate`` is the student's alone) and runs without
gradients; its weights are the EMA of all the student's. The expected values are read off the step's
public effects (the loss centres, the teacher's weights) and computed from float64 copies run crop by
crop in eval mode, so a teacher that drops residual branches at random gives other centres.
"""

import copy

import pytest
import torch
from engine_utils import CPU, batch, reference_outputs, tiny_config
from eval_utils import write_colour_classes

from adclr import train_step
from adclr.evaluation.during_training import EvalConfig, evaluate_backbone
from adclr.schedules import StepSettings

SETTINGS = StepSettings(lr=0.01, weight_decay=0.04, teacher_temp=0.07, momentum=0.9, freeze_last_layer=False)
DROP_PATH = 0.5  # the student's; large, so that a teacher that had it would drop blocks in most samples


@pytest.mark.parametrize("fused_loss", [True, False], ids=["fused_loss", "unfused_loss"])
def test_teacher_targets_have_no_drop_path_when_the_student_has_it(fused_loss):
    """With ``drop_path_rate`` 0.5 and the networks in the modes ``train.py`` runs them in, the centres move
    to the batch means of the deterministic teacher: its float64 copy in eval mode, crop by crop."""
    config = tiny_config(drop_path_rate=DROP_PATH, fused_loss=fused_loss, num_query=3, local_crops_number=1)
    state = train_step.build_train_state(config, CPU)
    state.student.train()  # as train.py does each epoch; the teacher keeps the mode it was built in
    with torch.no_grad():
        state.loss.center.normal_(std=0.05)
        state.loss.query_center.normal_(std=0.05)
    crops, query_crops = batch(config, batch_size=4)
    center, query_center = state.loss.center.clone().double(), state.loss.query_center.clone().double()
    teacher64 = copy.deepcopy(state.teacher).double().eval()
    with torch.no_grad():
        teacher_cls, teacher_query = reference_outputs(teacher64, [c.double() for c in crops[:2]], query_crops.double())
    train_step.training_step(state, crops, query_crops, SETTINGS)
    m = 0.9  # the loss centres' momentum
    expected = m * center + (1 - m) * teacher_cls.mean(dim=(0, 1))
    expected_query = m * query_center + (1 - m) * teacher_query.mean(dim=(0, 1, 2))
    torch.testing.assert_close(state.loss.center.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(state.loss.query_center.double(), expected_query, rtol=0, atol=1e-6)


def test_student_has_the_configured_stochastic_depth():
    """The student drops blocks in train mode, with DINO's (timm's) linear rule: block i of n at rate i / (n - 1)."""
    config = tiny_config(drop_path_rate=DROP_PATH)
    state = train_step.build_train_state(config, CPU)
    blocks = state.student.backbone.blocks
    rates = [float(getattr(block.drop_path1, "drop_prob", 0.0)) for block in blocks]
    assert rates == pytest.approx([DROP_PATH * i / (len(blocks) - 1) for i in range(len(blocks))])
    images = torch.randn(4, 3, config.data.global_size, config.data.global_size)
    backbone = state.student.backbone.train()
    with torch.no_grad():
        torch.manual_seed(0)
        first = backbone(images).cls
        torch.manual_seed(1)
        second = backbone(images).cls
        deterministic = backbone.eval()(images).cls
    assert not torch.allclose(first, second)  # a different seed drops other blocks
    torch.testing.assert_close(deterministic, state.teacher.backbone.eval()(images).cls)  # same weights, no drops


def test_teacher_forward_builds_no_graph_and_gets_no_gradient(monkeypatch):
    """The teacher's outputs reach the loss without autograd history, and no teacher parameter gets a gradient."""
    config = tiny_config(fused_loss=False)
    state = train_step.build_train_state(config, CPU)
    seen = []
    forward = state.loss.forward

    def spy(student_cls, teacher_cls, student_query, teacher_query, teacher_temp):
        seen.append((teacher_cls, teacher_query, student_cls))
        return forward(student_cls, teacher_cls, student_query, teacher_query, teacher_temp)

    monkeypatch.setattr(state.loss, "forward", spy)
    train_step.training_step(state, *batch(config), SETTINGS)
    [(teacher_cls, teacher_query, student_cls)] = seen
    assert student_cls.requires_grad  # the spy sees the graph where there is one
    assert not teacher_cls.requires_grad and teacher_cls.grad_fn is None
    assert not teacher_query.requires_grad and teacher_query.grad_fn is None
    assert all(p.grad is None and not p.requires_grad for p in state.teacher.parameters())


def test_ema_covers_every_parameter_even_a_frozen_last_layer():
    """During the first epoch the student's last layers get no update, yet the teacher's still move toward
    them: DINO's EMA runs over every parameter (backbone, both heads, last layers), not over those stepped."""
    config = tiny_config(separate_query_head=True, norm_last_layer=False, num_query=3)
    state = train_step.build_train_state(config, CPU)
    with torch.no_grad():
        for teacher in state.teacher.parameters():
            teacher.add_(0.05 * torch.randn_like(teacher))  # a teacher away from the student everywhere
    before = {n: p.detach().clone() for n, p in state.teacher.named_parameters()}
    student_before = {n: p.detach().clone() for n, p in state.student.named_parameters()}
    settings = StepSettings(**{**SETTINGS.__dict__, "freeze_last_layer": True})
    train_step.training_step(state, *batch(config), settings)
    student = dict(state.student.named_parameters())
    frozen = [n for n in student if "last_layer" in n]
    assert frozen and all(torch.equal(student[n], student_before[n]) for n in frozen)
    assert state.student.query_head is not None
    m = settings.momentum
    for name, param in state.teacher.named_parameters():
        expected = m * before[name] + (1 - m) * student[name].detach()
        torch.testing.assert_close(param, expected, rtol=0, atol=1e-6, msg=name)
        assert not torch.equal(param, before[name]), f"{name} did not move"


def test_trainer_evaluation_runs_the_backbone_in_eval_mode(tmp_path, monkeypatch):
    """The trainer evaluates its teacher while it is in train mode; the k-NN features must come from eval mode
    (a student evaluated with --which student has drop-path), and the mode is given back afterwards."""
    import adclr.evaluation.during_training

    write_colour_classes(tmp_path / "train", per_class=2, seed=0)
    write_colour_classes(tmp_path / "val", per_class=1, seed=1)
    config = tiny_config(drop_path_rate=DROP_PATH)
    backbone = train_step.build_train_state(config, CPU).student.backbone.train()
    images = torch.randn(3, 3, config.data.global_size, config.data.global_size)
    with torch.no_grad():
        expected = copy.deepcopy(backbone).eval()(images).cls
    modes = []

    def spy(frozen, *args, ks, **kwargs):
        modes.append(frozen.training or any(m.training for m in frozen.modules()))
        with torch.no_grad():
            torch.testing.assert_close(frozen(images).cls, expected)
        return {k: {"top1": 0.0, "top5": None} for k in ks}

    monkeypatch.setattr(adclr.evaluation.during_training, "knn_evaluate", spy)
    size = config.data.global_size
    evaluate_backbone(backbone, EvalConfig(data_path=str(tmp_path), image_size=size, resize_size=size), CPU)
    assert modes == [False]
    assert backbone.training and all(m.training for m in backbone.modules())
