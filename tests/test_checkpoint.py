"""Checkpoints: the versioned format round trip, unversioned files converted, bad files refused by name."""

import argparse
import copy
import os
import stat

import numpy as np
import pytest
import torch
from engine_utils import CPU, SETTINGS, assert_same, batch, snapshot, tiny_config

from adclr import checkpoint, engine
from adclr.checkpoint import CheckpointError, load_backbone, load_checkpoint, restore, save_checkpoint

HISTORY = [{"epoch": 1, "loss": 5.25, "lr": np.float64(0.001), "knn_top1_teacher": float("nan")}]


@pytest.fixture(scope="module")
def trained():
    """A config and a state after two steps (AdamW moments, moved centres, EMA teacher)."""
    config = tiny_config(seed=3)
    state = engine.build_train_state(config, CPU)
    for _ in range(2):
        engine.training_step(state, *batch(config), SETTINGS)
    return config, state


def legacy_payload(config, state):
    """What train.py wrote before the format had a version: flat ``args``, ``random_init``, numpy scalars."""
    optimizer = state.optimizer.state_dict()
    for group in optimizer["param_groups"]:
        group["lr"] = np.float64(group["lr"])
    return {
        "student": state.student.state_dict(),
        "teacher": state.teacher.state_dict(),
        "random_init": state.teacher.backbone.state_dict(),
        "optimizer": optimizer,
        "scaler": state.scaler.state_dict(),
        "loss": state.loss.state_dict(),
        "epoch": 2,
        "history": [{"epoch": 1, "loss": 5.0}, {"epoch": 2, "loss": 4.0}],
        "args": config.flat(),
    }


def test_round_trip_reads_with_weights_only_and_restores_everything(tmp_path, trained):
    config, state = trained[0], copy.deepcopy(trained[1])  # this test trains on: leave the shared state alone
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint(path, state, config, 2, HISTORY)

    raw = torch.load(path, weights_only=True)  # plain torch, no allowlist: tensors and plain containers only
    assert (raw["format"], raw["version"], raw["epoch"]) == ("adclr-checkpoint", 1, 2)
    assert raw["config"] == config.to_dict() and type(raw["history"][0]["lr"]) is float
    assert not {"args", "random_init"} & set(raw)

    saved = load_checkpoint(path)
    assert saved.config == config and saved.epoch == 2
    assert saved.history[0]["lr"] == 0.001 and np.isnan(saved.history[0]["knn_top1_teacher"])
    fresh = engine.build_train_state(tiny_config(seed=4), CPU)
    restore(saved, fresh)
    expected, actual = snapshot(state), snapshot(fresh)
    expected.pop("grads"), actual.pop("grads")
    assert_same(expected, actual)
    # and the restored state trains on exactly as the original does
    crops, query_crops = batch(config)
    assert engine.training_step(fresh, crops, query_crops, SETTINGS) == engine.training_step(
        state, crops, query_crops, SETTINGS
    )


def test_written_atomically_with_the_users_permissions(tmp_path, trained, monkeypatch):
    config, state = trained
    path = tmp_path / "checkpoint.pth"
    old_umask = os.umask(0o027)
    try:
        save_checkpoint(str(path), state, config, 1, [])
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(path), state, config, 2, [])
    assert path.read_bytes() == before  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # and no temporary file is left behind


def test_unversioned_checkpoint_is_converted(tmp_path, trained):
    config, state = trained
    path = str(tmp_path / "old.pth")
    torch.save(legacy_payload(config, state), path)
    saved = load_checkpoint(path)
    assert saved.config == config and saved.epoch == 2 and saved.history[1] == {"epoch": 2, "loss": 4.0}
    assert all(type(g["lr"]) is float for g in saved.states["optimizer"]["param_groups"])
    fresh = engine.build_train_state(config, CPU)
    restore(saved, fresh)
    assert_same(fresh.teacher.state_dict(), state.teacher.state_dict())
    backbone, run = load_backbone(path, "student")
    assert_same(backbone.state_dict(), state.student.backbone.state_dict())
    assert (run.arch, run.patch_size, run.global_size, run.seed) == ("vit_pico", 8, 32, 3)


def test_unversioned_checkpoint_without_a_setting_is_refused(tmp_path, trained):
    config, state = trained
    payload = legacy_payload(config, state)
    del payload["args"]["head_hidden_dim"]
    path = str(tmp_path / "older.pth")
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=f"{path} is an unversioned checkpoint without .*'head_hidden_dim'"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "truncated"),
        (b"", "truncated"),
        (b"this is not a checkpoint" * 20, "truncated"),
        (
            {"args": argparse.Namespace(lr=0.1), "student": {}},
            r"holds a Python object \(argparse.Namespace\), which is never unpickled",
        ),
        ([torch.zeros(2)], "holds a list, not a checkpoint dict"),
        ({"weights": torch.zeros(2)}, "not a train.py checkpoint"),
        ({"format": "other-tool", "version": 1}, "is a 'other-tool' file"),
        ({"format": "adclr-checkpoint", "version": 2}, "format version 2; this code reads versions 1 to 1"),
        ({"format": "adclr-checkpoint", "version": 1, "config": {}}, r"lacks \['epoch', 'history'"),
    ],
)
def test_bad_files_are_refused_with_their_name_and_why(tmp_path, trained, content, reason):
    path = str(tmp_path / "bad.pth")
    if content is None:  # a checkpoint cut short, as by a full disk without the atomic write
        save_checkpoint(path, trained[1], trained[0], 1, [])
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif isinstance(content, bytes):
        open(path, "wb").write(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=f"^{path}.*{reason}"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=f"^{path}"):
        load_backbone(path)


def test_missing_file_and_bad_config_are_refused(tmp_path, trained):
    config, state = trained
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(str(tmp_path / "nowhere.pth"))
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(path, state, config, 1, [])
    raw = torch.load(path, weights_only=True)
    raw["config"]["model"]["colour"] = "red"
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="unusable config: unknown field"):
        load_checkpoint(path)


def test_restore_into_another_architecture_says_so(tmp_path, trained):
    config, state = trained
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(path, state, config, 1, [])
    other = engine.build_train_state(tiny_config(out_dim=48), CPU)
    with pytest.raises(CheckpointError, match="its student does not fit this run's configuration"):
        restore(load_checkpoint(path), other)


def test_load_backbone(tmp_path, trained):
    config, state = trained
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(path, state, config, 1, [])
    backbone, run = load_backbone(path)
    assert not backbone.training and run == config
    assert_same(backbone.state_dict(), state.teacher.backbone.state_dict())
    assert {b.attn.backend for b in backbone.blocks} == {"reference"}
    with pytest.raises(ValueError, match="branch must be one of"):
        load_backbone(path, "ema")
    assert checkpoint.BRANCHES == ("teacher", "student")
