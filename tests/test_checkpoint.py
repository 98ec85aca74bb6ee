"""Checkpoints: the versioned format round trip; unversioned and bad files refused by name."""

import argparse
import copy
import errno
import os
import stat

import numpy as np
import pytest
import torch
from engine_utils import CPU, SETTINGS, assert_same, batch, snapshot, tiny_config

from adclr import checkpoint, train_step
from adclr.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    find_resumable,
    load_backbone,
    load_checkpoint,
    restore,
    save_checkpoint,
    set_aside,
)

HISTORY = [{"epoch": 1, "loss": 5.25, "lr": np.float64(0.001), "knn_top1_teacher": float("nan")}]


@pytest.fixture(scope="module")
def trained():
    """A config and a state after two steps (AdamW moments, moved centres, EMA teacher)."""
    config = tiny_config(seed=3)
    state = train_step.build_train_state(config, CPU)
    for _ in range(2):
        train_step.training_step(state, *batch(config), SETTINGS)
    return config, state


def legacy_payload(config, state):
    """What train.py wrote before the format had a version: flat ``args`` and a ``random_init`` backbone."""
    return {
        "student": state.student.state_dict(),
        "teacher": state.teacher.state_dict(),
        "random_init": state.teacher.backbone.state_dict(),
        "optimizer": state.optimizer.state_dict(),
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
    fresh = train_step.build_train_state(tiny_config(seed=4), CPU)
    restore(saved, fresh)
    expected, actual = snapshot(state), snapshot(fresh)
    expected.pop("grads"), actual.pop("grads")
    assert_same(expected, actual)
    # and the restored state trains on exactly as the original does
    crops, query_crops = batch(config)
    assert train_step.training_step(fresh, crops, query_crops, SETTINGS) == train_step.training_step(
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
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    message = f"^cannot write {path}: No space left on device \\(the previous file there is kept\\)$"
    with pytest.raises(CheckpointWriteError, match=message):
        save_checkpoint(str(path), state, config, 2, [])
    assert path.read_bytes() == before  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # and no temporary file is left behind


def test_unversioned_checkpoint_is_refused_by_name(tmp_path, trained):
    """A file of the format before it had a version (its config a flat ``args`` dict) is not read as one."""
    config, state = trained
    path = str(tmp_path / "old.pth")
    torch.save(legacy_payload(config, state), path)
    with pytest.raises(CheckpointError, match=f"^{path} is not a train.py checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content, reason, corrupt",
    [
        (None, "truncated", True),
        (b"", "is empty", True),
        (b"this is not a checkpoint" * 20, "truncated", True),
        (b"\x80\x02 garbage", "truncated", True),
        (
            {"args": argparse.Namespace(lr=0.1), "student": {}},
            r"holds a Python object \(argparse.Namespace\), which is never unpickled",
            False,
        ),
        ([torch.zeros(2)], "holds a list, not a checkpoint dict", False),
        ({"weights": torch.zeros(2)}, "not a train.py checkpoint", False),
        ({"format": "other-tool", "version": 1}, "is a 'other-tool' file", False),
        ({"format": "adclr-checkpoint", "version": 2}, "format version 2; this code reads versions 1 to 1", False),
        ({"format": "adclr-checkpoint", "version": 1, "config": {}}, r"lacks \['epoch', 'history'", False),
    ],
)
def test_bad_files_are_refused_with_their_name_and_why(tmp_path, trained, content, reason, corrupt):
    """Only a file that cannot be read at all is corrupt (resume may fall back from it); one that reads but is
    something else needs the user's decision."""
    path = str(tmp_path / "bad.pth")
    if content is None:  # a checkpoint cut short, as by a full disk without the atomic write
        save_checkpoint(path, trained[1], trained[0], 1, [])
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif isinstance(content, bytes):
        open(path, "wb").write(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=f"^{path}.*{reason}") as caught:
        load_checkpoint(path)
    assert isinstance(caught.value, CorruptCheckpointError) == corrupt
    assert "\n" not in str(caught.value)  # one line, whatever torch said
    with pytest.raises(CheckpointError, match=f"^{path}"):
        load_backbone(path)


def spoil(path, how: str) -> None:
    """Make the checkpoint at ``path`` unreadable as a crash, a full disk or a stray write would."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # garbage: random bytes of the same length
        path.write_bytes(torch.randint(0, 256, (len(data),), dtype=torch.uint8).numpy().tobytes())


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_a_corrupt_checkpoint_falls_back_to_the_newest_readable_numbered_one(tmp_path, trained, how):
    config, state = trained
    for epoch in (8, 9, 10, 11):  # numbered by epoch: 10 is newer than 9 though "checkpoint0010" sorts after
        save_checkpoint(str(tmp_path / f"checkpoint{epoch:04d}.pth"), state, config, epoch, [{"epoch": epoch}])
    latest = tmp_path / "checkpoint.pth"
    save_checkpoint(str(latest), state, config, 12, [])
    spoil(latest, how)
    spoil(tmp_path / "checkpoint0011.pth", "truncated")
    before = latest.read_bytes()
    saved, passed_over = find_resumable(str(tmp_path))
    assert (saved.path, saved.epoch, saved.history) == (str(tmp_path / "checkpoint0010.pth"), 10, [{"epoch": 10}])
    assert [path for path, _ in passed_over] == [str(latest), str(tmp_path / "checkpoint0011.pth")]
    assert all(reason.startswith(f"{path} ") for path, reason in passed_over)
    assert latest.read_bytes() == before  # finding renames nothing: every process of a run may look
    moved = set_aside(str(latest))
    assert moved.startswith(f"{latest}.corrupt-") and open(moved, "rb").read() == before and not latest.exists()


@pytest.mark.parametrize("numbered", [0, 2])
def test_a_corrupt_checkpoint_without_a_readable_fallback_stops_the_resume(tmp_path, trained, numbered):
    """Never a silent restart from epoch 0: the error names every unreadable file and touches none."""
    config, state = trained
    latest = tmp_path / "checkpoint.pth"
    save_checkpoint(str(latest), state, config, 3, [])
    spoil(latest, "truncated")
    for epoch in range(1, numbered + 1):
        save_checkpoint(str(tmp_path / f"checkpoint{epoch:04d}.pth"), state, config, epoch, [])
        spoil(tmp_path / f"checkpoint{epoch:04d}.pth", "empty")
    files = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    either = "none of the numbered checkpoints reads either" if numbered else "there is no numbered checkpoint"
    with pytest.raises(CheckpointError, match=f"^cannot resume: {latest} cannot be read.*{either}") as caught:
        find_resumable(str(tmp_path))
    assert all(f"checkpoint{epoch:04d}.pth is empty" in str(caught.value) for epoch in range(1, numbered + 1))
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == files


def test_a_readable_checkpoint_of_another_kind_is_no_reason_to_fall_back(tmp_path, trained):
    config, state = trained
    save_checkpoint(str(tmp_path / "checkpoint0001.pth"), state, config, 1, [])
    torch.save({"format": "adclr-checkpoint", "version": 99}, tmp_path / "checkpoint.pth")  # a newer adclr's
    with pytest.raises(CheckpointError, match="format version 99") as caught:
        find_resumable(str(tmp_path))
    assert not isinstance(caught.value, CorruptCheckpointError)
    os.remove(tmp_path / "checkpoint.pth")  # set aside by an earlier fallback: the newest numbered one resumes
    resumed, corrupt = find_resumable(str(tmp_path))
    assert resumed.path == str(tmp_path / "checkpoint0001.pth") and resumed.epoch == 1 and corrupt == []
    os.remove(tmp_path / "checkpoint0001.pth")
    assert find_resumable(str(tmp_path)) == (None, [])  # no checkpoint at all: a fresh run


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
    other = train_step.build_train_state(tiny_config(out_dim=48), CPU)
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


def test_a_run_without_fp16_resumes_with_fp16_on_a_fresh_scale(tmp_path, trained):
    """The fp32 run's scaler was disabled (no state): an fp16 resume starts its scaler afresh and loads the rest."""
    config, state = trained
    save_checkpoint(str(tmp_path / "checkpoint.pth"), state, config, 2, [])
    fp16 = train_step.build_train_state(tiny_config(seed=3, precision="fp16"), CPU)
    restore(load_checkpoint(str(tmp_path / "checkpoint.pth")), fp16)
    assert fp16.scaler.is_enabled() and fp16.scaler.get_scale() == 2.0**16
    assert_same(fp16.student.state_dict(), state.student.state_dict())
