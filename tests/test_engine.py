"""``adclr.train_step``: networks from a config, the random-init baseline, schedules, and one training step."""

import copy
import dataclasses
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from engine_utils import CPU, SETTINGS, assert_same, batch, reference_step_loss, snapshot, tiny_config

from adclr import train_step
from adclr.schedules import build_schedules


def test_teacher_starts_as_the_student_and_the_init_depends_only_on_the_seed():
    config = tiny_config()
    torch.manual_seed(123)
    a = train_step.build_train_state(config, CPU)
    torch.manual_seed(456)  # the global random state does not matter
    b = train_step.build_train_state(config, CPU)
    assert_same(a.student.state_dict(), a.teacher.state_dict())  # the teacher has no drop-path, same weights
    assert_same(a.student.state_dict(), b.student.state_dict())
    assert not any(p.requires_grad for p in a.teacher.parameters())
    other = train_step.build_train_state(tiny_config(seed=1), CPU)
    assert not torch.equal(other.student.backbone.cls_token, a.student.backbone.cls_token)


def test_building_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_step.build_train_state(tiny_config(), CPU)
    train_step.random_init_backbone(tiny_config())
    assert torch.equal(torch.rand(3), expected)


def test_random_init_baseline_is_the_initial_student_backbone():
    config = tiny_config(drop_path_rate=0.1)
    state = train_step.build_train_state(config, CPU)
    initial = copy.deepcopy(state.student.backbone.state_dict())
    train_step.training_step(state, *batch(config), SETTINGS)  # training moves the student, not the baseline
    baseline = train_step.random_init_backbone(config)
    assert_same(baseline.state_dict(), initial)
    assert not baseline.training
    assert not torch.equal(state.student.backbone.cls_token, baseline.cls_token)


def test_step_returns_floats_and_updates_student_teacher_optimizer_and_centres():
    config = tiny_config()
    state = train_step.build_train_state(config, CPU)
    before = snapshot(state)
    losses = train_step.training_step(state, *batch(config), SETTINGS)
    assert all(isinstance(v, float) and math.isfinite(v) for v in (losses.loss, losses.cls, losses.query))
    assert losses.loss == pytest.approx(losses.cls + config.loss.lambda_query * losses.query, rel=1e-6)
    after = snapshot(state)
    for key in ("student", "teacher", "loss"):
        changed = [n for n in before[key] if not torch.equal(before[key][n], after[key][n])]
        assert changed, f"{key} did not change"
    assert after["optimizer"]["state"], "AdamW has no moments after a step"
    assert all(group["lr"] == SETTINGS.lr for group in state.optimizer.param_groups)
    decay, no_decay = state.optimizer.param_groups
    assert decay["weight_decay"] == SETTINGS.weight_decay and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("separate_query_head", [False, True])
def test_frozen_last_layer_does_not_move(separate_query_head):
    """While frozen, every head's last layer stays put (and gets no weight decay); the rest trains."""
    config = tiny_config(separate_query_head=separate_query_head, norm_last_layer=False)
    state = train_step.build_train_state(config, CPU)
    params = dict(state.student.named_parameters())
    last = {n: p.detach().clone() for n, p in params.items() if "last_layer" in n}
    assert len(last) == (4 if separate_query_head else 2)  # weight-norm direction and magnitude per head
    others = {n: p.detach().clone() for n, p in params.items() if n not in last}
    frozen = dataclasses.replace(SETTINGS, freeze_last_layer=True)
    train_step.training_step(state, *batch(config), frozen)
    assert all(torch.equal(params[n], value) for n, value in last.items())
    assert all(not torch.equal(params[n], value) for n, value in others.items())
    train_step.training_step(state, *batch(config), SETTINGS)
    assert all(not torch.equal(params[n], value) for n, value in last.items())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_non_finite_loss_raises_before_any_update(precision):
    config = tiny_config(precision=precision)
    state = train_step.build_train_state(config, CPU)
    train_step.training_step(state, *batch(config), SETTINGS)  # AdamW moments, moved centres and EMA exist
    before = snapshot(state)
    crops, query_crops = batch(config)
    crops[0][1, :, 3, 5] = float("nan")  # one bad pixel in one image
    other_settings = dataclasses.replace(SETTINGS, lr=0.5, weight_decay=0.5, momentum=0.5)
    with pytest.raises(train_step.NonFiniteLossError, match="Loss is nan") as caught:
        train_step.training_step(state, crops, query_crops, other_settings)
    assert math.isnan(caught.value.losses.loss)
    assert_same(before, snapshot(state))
    losses = train_step.training_step(state, *batch(config), SETTINGS)  # and training goes on from there
    assert math.isfinite(losses.loss)


def test_schedules_follow_the_config():
    config = tiny_config(epochs=4, warmup_epochs=1, lr=0.004, min_lr=1e-4, weight_decay_end=0.4, freeze_last_layer=2)
    schedules = build_schedules(config, iters_per_epoch=5, world_size=2)
    peak = 0.004 * config.optim.batch_size_per_gpu * 2 / 256
    assert len(schedules.lr) == 20
    assert schedules.at(0).lr == 0.0 and schedules.at(5).lr == pytest.approx(peak)
    assert schedules.at(19).lr == pytest.approx(1e-4, rel=0.05)
    assert schedules.at(0).weight_decay == pytest.approx(0.04) and schedules.at(19).weight_decay == pytest.approx(
        0.4, rel=0.05
    )
    assert [schedules.at(s).freeze_last_layer for s in (0, 9, 10, 19)] == [True, True, False, False]
    assert schedules.at(0).momentum == config.loss.momentum_teacher
    settings = schedules.at(3)
    assert all(type(v) is float for v in (settings.lr, settings.weight_decay, settings.teacher_temp, settings.momentum))


UNION_BATCH = 6  # images per step over both processes; each process trains on its half


def _union_batches(config):
    """Two steps' batches of ``UNION_BATCH`` images, the same in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return [batch(config, UNION_BATCH) for _ in range(2)]


UNUSED_QUERY_HEAD = {"lambda_query_0": dict(lambda_query=0.0), "num_query_0": dict(num_query=0)}


def _ddp_worker(rank, world_size, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A bounded timeout: a process left waiting in a collective fails the test instead of hanging it.
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    results = {}
    try:
        # Two steps on this process's half of each union batch.
        config = tiny_config()
        state = train_step.build_train_state(config, CPU)
        assert isinstance(state.student_ddp, torch.nn.parallel.DistributedDataParallel)
        half = slice(rank * UNION_BATCH // 2, (rank + 1) * UNION_BATCH // 2)
        losses = [
            dataclasses.astuple(train_step.training_step(state, [c[half] for c in crops], query_crops[half], SETTINGS))
            for crops, query_crops in _union_batches(config)
        ]
        results["union"] = {"state": snapshot(state), "losses": losses}

        # Then a NaN on one process only.
        crops, query_crops = batch(config)
        if rank == 1:
            crops[0][0, 0, 0, 0] = float("nan")
        try:
            train_step.training_step(state, crops, query_crops, SETTINGS)
            results["stopped"] = ""
        except train_step.NonFiniteLossError as error:
            results["stopped"] = str(error)

        # A separate query head that the loss does not use must not break DDP's gradient reduction.
        for name, overrides in UNUSED_QUERY_HEAD.items():
            config = tiny_config(separate_query_head=True, **overrides)
            state = train_step.build_train_state(config, CPU)
            try:
                for _ in range(2):
                    crops, query_crops = batch(config)
                    train_step.training_step(state, crops, query_crops if config.data.num_query else None, SETTINGS)
                results[name] = {"error": "", "teacher": state.teacher.state_dict()}
            except RuntimeError as error:
                results[name] = {"error": str(error)}
    finally:
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """The results of ``_ddp_worker`` on two gloo processes: one spawn for every DDP test."""
    result_dir = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(result_dir)), nprocs=2, join=True)
    return [torch.load(result_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def _float64_union_run(config):
    """The two union-batch steps in float64, written out: each crop through float64 copies of the initial
    networks (``reference_outputs``), the loop loss (``reference_loss``), the centres' EMA of the teacher's
    batch mean, per-parameter clipping, AdamW with DINO's groups, the teacher's EMA. Returns a snapshot and
    the losses of each step: the exact answer both float32 runs are measured against."""
    state = train_step.build_train_state(config, CPU, distributed=False)  # only for its initial weights
    student, teacher = state.student.double(), state.teacher.double()
    center = torch.zeros(1, config.model.out_dim, dtype=torch.float64)
    query_center = torch.zeros_like(center)
    params = dict(student.named_parameters())
    no_decay = [p for n, p in params.items() if p.ndim <= 1 or n.endswith(".bias")]
    decay = [p for p in params.values() if all(p is not q for q in no_decay)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": SETTINGS.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=SETTINGS.lr,
    )
    losses = []
    for crops, query_crops in _union_batches(config):
        crops, query_crops = [c.double() for c in crops], query_crops.double()
        terms, teacher_cls, teacher_query = reference_step_loss(
            student,
            teacher,
            crops,
            query_crops,
            center[0],
            query_center[0],
            SETTINGS.teacher_temp,
            config.loss.lambda_query,
        )
        losses.append(tuple(t.item() for t in terms))
        center = 0.9 * center + 0.1 * teacher_cls.mean(dim=(0, 1))
        query_center = 0.9 * query_center + 0.1 * teacher_query.mean(dim=(0, 1, 2))
        optimizer.zero_grad()
        terms[0].backward()
        for param in params.values():
            torch.nn.utils.clip_grad_norm_(param, config.optim.clip_grad)
        optimizer.step()
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.mul_(SETTINGS.momentum).add_(s, alpha=1 - SETTINGS.momentum)
    expected = snapshot(state)
    expected["loss"] = {"center": center, "query_center": query_center}
    return expected, losses


def _error(value, exact) -> float:
    return (
        (torch.as_tensor(value, dtype=torch.float64) - torch.as_tensor(exact, dtype=torch.float64)).abs().max().item()
    )


@pytest.mark.slow
def test_two_processes_train_as_one_process_on_the_union_batch(ddp_runs):
    """Gradient averaging, the all-reduced loss centres and the EMA together: two processes on halves of
    each batch end where one process ends on the whole batches (a centre computed from one process's
    half, or a teacher updated before the gradients are averaged, would not).

    The two float32 runs sum in different orders (halves then an all-reduce; the thread count of the one
    process), so they may differ by rounding and no fixed tolerance is right on every machine. Both are
    measured against the same steps in float64: the two processes' error must stay within twice the one
    process's own error, tensor by tensor, plus two float32 ulps of the tensor's largest entry (what
    rounding the exact value to float32 costs). That is the error a reduction order can cause, whatever
    the machine, its load or its thread count; a wrong averaging or centre is orders of magnitude above it.
    """
    config = tiny_config()
    single = train_step.build_train_state(config, CPU, distributed=False)
    losses = [dataclasses.astuple(train_step.training_step(single, *b, SETTINGS)) for b in _union_batches(config)]
    rank0, rank1 = (run["union"] for run in ddp_runs)
    for key in ("grads", "student", "teacher", "loss"):
        assert_same(rank0["state"][key], rank1["state"][key], key)
    exact, exact_losses = _float64_union_run(config)
    one_process = snapshot(single)
    ulp = torch.finfo(torch.float32).eps
    for key in ("grads", "loss", "student", "teacher"):  # gradients of the second step, averaged and clipped
        assert exact[key].keys() == one_process[key].keys() == rank0["state"][key].keys(), key
        for name, value in exact[key].items():
            two_error, one_error = _error(rank0["state"][key][name], value), _error(one_process[key][name], value)
            allowed = 2 * one_error + 2 * ulp * value.abs().max().item()
            assert two_error <= allowed, f"{key}/{name}: error {two_error:.2e}, one process's {one_error:.2e}"
    for step, exact_step in enumerate(exact_losses):  # each process's loss is the mean over its half
        mean = [(a + b) / 2 for a, b in zip(rank0["losses"][step], rank1["losses"][step])]
        for term, two, one, value in zip(("loss", "cls", "query"), mean, losses[step], exact_step):
            allowed = 2 * _error(one, value) + 2 * ulp * abs(value)
            assert _error(two, value) <= allowed, f"step {step} {term}: {two} vs {one}, float64 {value}"


@pytest.mark.slow
def test_processes_stop_together_when_one_loss_is_not_finite(ddp_runs):
    assert ddp_runs[1]["stopped"].startswith("Loss is nan")
    assert ddp_runs[0]["stopped"].startswith("Loss is not finite on another process")


@pytest.mark.slow
@pytest.mark.parametrize("case", UNUSED_QUERY_HEAD)
def test_ddp_trains_with_a_separate_query_head_the_loss_does_not_use(ddp_runs, case):
    """``--separate_query_head`` with ``--lambda_query 0`` or ``--num_query 0``: no unused head, no DDP error."""
    rank0, rank1 = (run[case] for run in ddp_runs)
    assert rank0["error"] == "" and rank1["error"] == "", rank0["error"][:500]
    assert_same(rank0["teacher"], rank1["teacher"])
    assert not any(name.startswith("query_head.") for name in rank0["teacher"])


def test_query_head_is_built_only_when_the_query_loss_uses_it():
    def has_query_head(**overrides):
        return train_step.build_train_state(tiny_config(**overrides), CPU).student.query_head is not None

    assert has_query_head(separate_query_head=True)
    assert not has_query_head(separate_query_head=True, lambda_query=0.0)
    assert not has_query_head(separate_query_head=True, num_query=0)
    assert not has_query_head()


@pytest.mark.parametrize("fused, backend", [(True, "torch"), (True, "auto"), (False, "torch")])
def test_the_loss_follows_the_config(fused, backend):
    """``fused_loss`` picks the loss form and ``loss_backend`` reaches the fused loss's row operations."""
    loss = train_step.build_train_state(tiny_config(fused_loss=fused, loss_backend=backend), CPU).loss
    assert type(loss).__name__ == ("FusedADCLRLoss" if fused else "ADCLRLoss")
    assert getattr(loss, "backend", None) == (backend if fused else None)
