"""One ``train_step.training_step`` against an independent float64 pipeline, term by term.

The step runs on distinct global and local views, Q = 4 query crops, batch 3, a teacher that differs
from the student, non-zero loss centres and a teacher temperature of 0.07. The expected values come
from each crop run on its own through a float64 copy of the networks (``reference_outputs``), the loop
implementation of the paper's Eq. 6 (``reference_loss``), AdamW's first-step formula and the EMA
formula. Only the step's public effects are read (its losses, the student's gradients, parameters,
centres and teacher), so the same tests hold for any implementation of the step.
"""

import copy

import pytest
import torch
from engine_utils import CPU, batch, reference_step_loss, tiny_config

from adclr import train_step
from adclr.schedules import StepSettings

SETTINGS = StepSettings(lr=0.01, weight_decay=0.3, teacher_temp=0.07, momentum=0.9, freeze_last_layer=False)
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which the training step keeps


def _perturbed_state(config):
    """A state whose student, teacher and centres are all different and non-trivial (biases, norms, centres)."""
    state = train_step.build_train_state(config, CPU)
    with torch.no_grad():
        for student, teacher in zip(state.student.parameters(), state.teacher.parameters()):
            student.add_(0.05 * torch.randn_like(student))
            teacher.copy_(student + 0.05 * torch.randn_like(student))
        state.loss.center.normal_(std=0.05)
        state.loss.query_center.normal_(std=0.05)
    return state


@pytest.fixture(
    scope="module",
    params=[(False, True), (True, True), (False, False)],
    ids=["shared_head-fused_loss", "separate_query_head-fused_loss", "shared_head-unfused_loss"],
)
def step(request):
    """One training step (fused or unfused loss) and everything its expected effects are computed from."""
    torch.manual_seed(11)
    separate_query_head, fused_loss = request.param
    config = tiny_config(
        separate_query_head=separate_query_head,
        fused_loss=fused_loss,
        local_crops_number=2,
        num_query=4,
        clip_grad=0.0,
    )
    state = _perturbed_state(config)
    crops, query_crops = batch(config, batch_size=3)
    before = dict(
        student={n: p.detach().clone() for n, p in state.student.named_parameters()},
        teacher={n: p.detach().clone() for n, p in state.teacher.named_parameters()},
        center=state.loss.center.clone(),
        query_center=state.loss.query_center.clone(),
    )

    # The expected losses and gradients: float64 copies, each crop on its own, the loop loss.
    student64, teacher64 = copy.deepcopy(state.student).double(), copy.deepcopy(state.teacher).double()
    crops64, query_crops64 = [c.double() for c in crops], query_crops.double()
    expected, teacher_cls, teacher_query = reference_step_loss(
        student64,
        teacher64,
        crops64,
        query_crops64,
        before["center"][0],
        before["query_center"][0],
        SETTINGS.teacher_temp,
        config.loss.lambda_query,
    )
    expected[0].backward()

    losses = train_step.training_step(state, crops, query_crops, SETTINGS)
    return dict(
        config=config,
        state=state,
        losses=losses,
        before=before,
        expected_losses=[t.item() for t in expected],
        expected_grads={n: p.grad for n, p in student64.named_parameters() if p.grad is not None},
        teacher_cls=teacher_cls,
        teacher_query=teacher_query,
    )


def test_losses_match_the_reference(step):
    losses = step["losses"]
    assert [losses.loss, losses.cls, losses.query] == pytest.approx(step["expected_losses"], rel=2e-5)


def test_every_student_gradient_matches_the_reference(step):
    """clip_grad = 0, so the gradients the step leaves are those of its loss: every one against float64."""
    grads = {n: p.grad for n, p in step["state"].student.named_parameters() if p.grad is not None}
    assert grads.keys() == step["expected_grads"].keys()
    scale = max(g.abs().max().item() for g in step["expected_grads"].values())
    for name, expected in step["expected_grads"].items():
        err = (grads[name].double() - expected).abs().max().item()
        assert err <= 2e-4 * expected.abs().max().item() + 1e-6 * scale, f"{name}: error {err:.2e}"


def test_centres_move_to_the_teachers_batch_means(step):
    state, before = step["state"], step["before"]
    cls_mean = step["teacher_cls"].mean(dim=(0, 1))
    query_mean = step["teacher_query"].mean(dim=(0, 1, 2))
    torch.testing.assert_close(state.loss.center[0].double(), 0.9 * before["center"][0] + 0.1 * cls_mean)
    torch.testing.assert_close(state.loss.query_center[0].double(), 0.9 * before["query_center"][0] + 0.1 * query_mean)


def test_adamw_first_step_with_weight_decay_on_weight_matrices_only(step):
    """AdamW's first step is ``p (1 - lr wd) - lr g / (|g| + eps)``; DINO's groups: no decay on biases and
    norm parameters (1-D), decay on everything else (weights, CLS token, position embedding)."""
    state, before = step["state"], step["before"]["student"]
    lr, wd = SETTINGS.lr, SETTINGS.weight_decay
    decayed = set()
    for name, param in state.student.named_parameters():
        if param.grad is None:
            assert torch.equal(param, before[name]), f"{name} has no gradient but moved"
            continue
        decay = 0.0 if name.endswith(".bias") or "norm" in name else wd
        if decay:
            decayed.add(name)
        g = param.grad
        expected = before[name] * (1 - lr * decay) - lr * g / (g.abs() + ADAM_EPS)
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-6, msg=name)
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.blocks.0.attn.qkv.weight"} <= decayed


def test_teacher_is_the_ema_of_the_updated_student(step):
    """teacher <- m teacher + (1 - m) student, with the student after its update."""
    state, before = step["state"], step["before"]
    student = dict(state.student.named_parameters())
    m = SETTINGS.momentum
    for name, param in state.teacher.named_parameters():
        expected = m * before["teacher"][name] + (1 - m) * student[name].detach()
        torch.testing.assert_close(param, expected, rtol=0, atol=1e-6, msg=name)


def test_gradients_are_clipped_per_parameter():
    """DINO's clipping: each parameter's gradient norm is limited on its own (not the global norm)."""
    torch.manual_seed(5)
    crops, query_crops = batch(tiny_config(), batch_size=3)
    unclipped = train_step.build_train_state(tiny_config(clip_grad=0.0), CPU)
    train_step.training_step(unclipped, crops, query_crops, SETTINGS)
    raw = {n: p.grad for n, p in unclipped.student.named_parameters() if p.grad is not None}
    max_norm = torch.stack([g.norm() for g in raw.values()]).median().item()
    clipped = train_step.build_train_state(tiny_config(clip_grad=max_norm), CPU)
    train_step.training_step(clipped, crops, query_crops, SETTINGS)
    limited = 0
    for name, param in clipped.student.named_parameters():
        if name not in raw:
            continue
        norm = raw[name].norm().item()
        factor = min(1.0, max_norm / (norm + 1e-6))
        limited += factor < 1
        torch.testing.assert_close(param.grad, raw[name] * factor, rtol=1e-5, atol=1e-9, msg=name)
    assert 0 < limited < len(raw)
