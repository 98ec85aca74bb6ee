"""The engine: networks from a config, the random-init baseline, schedules, and one training step."""

import copy
import dataclasses
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp
from engine_utils import CPU, SETTINGS, assert_same, batch, snapshot, tiny_config

from adclr import engine


def test_teacher_starts_as_the_student_and_the_init_depends_only_on_the_seed():
    config = tiny_config()
    torch.manual_seed(123)
    a = engine.build_train_state(config, CPU)
    torch.manual_seed(456)  # the global random state does not matter
    b = engine.build_train_state(config, CPU)
    assert_same(a.student.state_dict(), a.teacher.state_dict())  # the teacher has no drop-path, same weights
    assert_same(a.student.state_dict(), b.student.state_dict())
    assert not any(p.requires_grad for p in a.teacher.parameters())
    other = engine.build_train_state(tiny_config(seed=1), CPU)
    assert not torch.equal(other.student.backbone.cls_token, a.student.backbone.cls_token)


def test_building_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    engine.build_train_state(tiny_config(), CPU)
    engine.random_init_backbone(tiny_config())
    assert torch.equal(torch.rand(3), expected)


def test_random_init_baseline_is_the_initial_student_backbone():
    config = tiny_config(drop_path_rate=0.1)
    state = engine.build_train_state(config, CPU)
    initial = copy.deepcopy(state.student.backbone.state_dict())
    engine.training_step(state, *batch(config), SETTINGS)  # training moves the student, not the baseline
    baseline = engine.random_init_backbone(config)
    assert_same(baseline.state_dict(), initial)
    assert not baseline.training
    assert not torch.equal(state.student.backbone.cls_token, baseline.cls_token)


def test_step_returns_floats_and_updates_student_teacher_optimizer_and_centres():
    config = tiny_config()
    state = engine.build_train_state(config, CPU)
    before = snapshot(state)
    losses = engine.training_step(state, *batch(config), SETTINGS)
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


def test_frozen_last_layer_does_not_move():
    config = tiny_config()
    state = engine.build_train_state(config, CPU)
    last = {n: p.detach().clone() for n, p in state.student.named_parameters() if "last_layer" in n and p.requires_grad}
    assert last
    frozen = dataclasses.replace(SETTINGS, freeze_last_layer=True)
    engine.training_step(state, *batch(config), frozen)
    params = dict(state.student.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in last.items())
    engine.training_step(state, *batch(config), SETTINGS)
    assert not all(torch.equal(params[n], value) for n, value in last.items())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_non_finite_loss_raises_before_any_update(precision):
    config = tiny_config(precision=precision)
    state = engine.build_train_state(config, CPU)
    engine.training_step(state, *batch(config), SETTINGS)  # AdamW moments, moved centres and EMA exist
    before = snapshot(state)
    crops, query_crops = batch(config)
    crops[0][1, :, 3, 5] = float("nan")  # one bad pixel in one image
    other_settings = dataclasses.replace(SETTINGS, lr=0.5, weight_decay=0.5, momentum=0.5)
    with pytest.raises(engine.NonFiniteLossError, match="Loss is nan") as caught:
        engine.training_step(state, crops, query_crops, other_settings)
    assert math.isnan(caught.value.losses.loss)
    assert_same(before, snapshot(state))
    losses = engine.training_step(state, *batch(config), SETTINGS)  # and training goes on from there
    assert math.isfinite(losses.loss)


def test_schedules_follow_the_config():
    config = tiny_config(epochs=4, warmup_epochs=1, lr=0.004, min_lr=1e-4, weight_decay_end=0.4, freeze_last_layer=2)
    schedules = engine.build_schedules(config, iters_per_epoch=5, world_size=2)
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


def _ddp_worker(rank, world_size, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A bounded timeout: a process left waiting in a collective fails the test instead of hanging it.
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        config = tiny_config()
        state = engine.build_train_state(config, CPU)
        assert isinstance(state.student_ddp, torch.nn.parallel.DistributedDataParallel)
        torch.manual_seed(rank)  # each process sees its own images
        for _ in range(2):
            engine.training_step(state, *batch(config), SETTINGS)
        crops, query_crops = batch(config)
        if rank == 1:
            crops[0][0, 0, 0, 0] = float("nan")  # only this process's loss is NaN
        try:
            engine.training_step(state, crops, query_crops, SETTINGS)
            stopped = ""
        except engine.NonFiniteLossError as error:
            stopped = str(error)
        torch.save(
            {"state": snapshot(state), "stopped": stopped},
            os.path.join(result_dir, f"rank{rank}.pt"),
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_processes_stay_identical_and_stop_together(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same(rank0["state"]["student"], rank1["state"]["student"])
    assert_same(rank0["state"]["teacher"], rank1["state"]["teacher"])
    assert_same(rank0["state"]["loss"], rank1["state"]["loss"])
    assert rank1["stopped"].startswith("Loss is nan")
    assert rank0["stopped"].startswith("Loss is not finite on another process")
