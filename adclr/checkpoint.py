"""Checkpoints: one versioned format, written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of tensors and plain containers, saved with ``torch.save`` and read with
``torch.load(weights_only=True)``::

    {"format": "adclr-checkpoint", "version": 1,
     "config": TrainConfig.to_dict(),          # plain dict, see adclr.config
     "epoch": completed epochs, "history": [one dict of floats per epoch],
     "student": state_dict, "teacher": state_dict, "optimizer": state_dict, "scaler": state_dict,
     "loss": state_dict}                       # the loss centres

Anything else is refused with a ``CheckpointError`` that names the file and says why (a
``CorruptCheckpointError`` when the file is torn or not written by ``torch.save`` at all).
``find_resumable`` picks the checkpoint a run resumes from, falling back from a corrupt
``checkpoint.pth`` to the newest readable ``checkpointNNNN.pth``.
"""

from __future__ import annotations

import datetime
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import TrainConfig
from .errors import CheckpointError, CheckpointWriteError, CorruptCheckpointError
from .files import atomic_write
from .model import ADCLRVisionTransformer
from .train_step import TrainState, build_backbone

FORMAT = "adclr-checkpoint"
VERSION = 1
BRANCHES = ("teacher", "student")
STATE_KEYS = ("student", "teacher", "optimizer", "scaler", "loss")

LATEST = "checkpoint.pth"  # rewritten every epoch; checkpointNNNN.pth are kept every saveckp_freq epochs
NUMBERED = re.compile(r"checkpoint(\d{4,})\.pth")


@dataclass
class Checkpoint:
    """A checkpoint as read from ``path``: the run's config, progress and state dicts."""

    path: str
    config: TrainConfig
    epoch: int
    history: list[dict[str, Any]]
    states: dict[str, dict]  # STATE_KEYS -> state_dict


def save_checkpoint(
    path: str, state: TrainState, config: TrainConfig, epoch: int, history: list[dict[str, Any]]
) -> None:
    """Write ``state`` after ``epoch`` completed epochs to ``path``, atomically (see ``save_atomic``)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "epoch": int(epoch),
        "history": [{key: _number(value) for key, value in record.items()} for record in history],
        "student": state.student.state_dict(),
        "teacher": state.teacher.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(),
        "loss": state.loss.state_dict(),
    }
    save_atomic(payload, path)


def save_atomic(payload: dict, path: str) -> None:
    """``torch.save`` ``payload`` to ``path`` with ``adclr.files.atomic_write``: never a torn file, the user's umask.

    A failed write (torch reports a full disk as a ``RuntimeError`` from its zip writer, chained to the
    ``OSError``) raises one ``CheckpointWriteError`` naming the file and the system's reason."""
    try:
        with atomic_write(path) as f:
            torch.save(payload, f)
    except (OSError, RuntimeError) as error:
        cause = next((e for e in (error, error.__cause__, error.__context__) if isinstance(e, OSError)), None)
        reason = cause.strerror if cause is not None and cause.strerror else str(error).strip().splitlines()[0]
        kept = "the previous file there is kept" if os.path.exists(path) else "nothing was written there"
        raise CheckpointWriteError(f"cannot write {path}: {reason} ({kept})") from None


def load_checkpoint(path: str) -> Checkpoint:
    """Read ``path`` (any format version this code knows); raises ``CheckpointError``."""
    raw = _read(path)
    if "format" not in raw:
        raise CheckpointError(f"{path} is not a train.py checkpoint (its keys are {list(raw)[:10]})")
    if raw["format"] != FORMAT:
        raise CheckpointError(f"{path} is a {raw['format']!r} file, not an {FORMAT!r}")
    version = raw.get("version")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise CheckpointError(
            f"{path} has format version {version!r}; this code reads versions 1 to {VERSION} (a newer adclr wrote it?)"
        )
    _require(raw, path, ("config", "epoch", "history", *STATE_KEYS))
    try:
        config = TrainConfig.from_dict(raw["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path} holds an unusable config: {error}") from None
    return Checkpoint(path, config, raw["epoch"], raw["history"], {key: raw[key] for key in STATE_KEYS})


def find_resumable(output_dir: str) -> tuple[Checkpoint | None, list[tuple[str, str]]]:
    """The checkpoint a run in ``output_dir`` resumes from, and the corrupt files (path, why) passed over.

    ``checkpoint.pth`` if it reads. If it is corrupt (empty, truncated, not written by ``torch.save``)
    or missing (set aside by an earlier fallback whose run stopped before writing a new one), the
    newest ``checkpointNNNN.pth`` that reads, passing over corrupt ones. None when the folder holds no
    checkpoint at all: a fresh run. Nothing is renamed here (``set_aside`` does that), so every process
    of a distributed run can call it.

    Raises ``CheckpointError`` when checkpoints exist but none reads (a run must never restart from
    epoch 0 unasked), or when a file reads but cannot be used (another tool's file, a newer format):
    those need the user's decision, not a fallback.
    """
    latest = os.path.join(output_dir, LATEST)
    numbered = sorted(
        (int(match.group(1)), name)
        for name in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
        if (match := NUMBERED.fullmatch(name))
    )
    candidates = [os.path.join(output_dir, name) for _, name in reversed(numbered)]
    if os.path.exists(latest):
        candidates.insert(0, latest)
    if not candidates:
        return None, []
    corrupt = []
    for path in candidates:
        try:
            return load_checkpoint(path), corrupt
        except CorruptCheckpointError as error:
            corrupt.append((path, str(error)))
    fallback = "none of the numbered checkpoints reads either" if numbered else "there is no numbered checkpoint"
    raise CheckpointError(
        f"cannot resume: {'; '.join(reason for _, reason in corrupt)}; {fallback} (checkpointNNNN.pth, every "
        f"--saveckp_freq epochs) to fall back on. Move the checkpoints in {output_dir} away to start from "
        "scratch, or choose another --output_dir"
    )


def set_aside(path: str) -> str:
    """Rename the corrupt file ``path`` to ``<path>.corrupt-<UTC time>`` (never delete it); returns the new name."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    new = f"{path}.corrupt-{stamp}"
    os.replace(path, new)
    return new


def restore(checkpoint: Checkpoint, state: TrainState) -> None:
    """Load ``checkpoint``'s networks, optimizer, scaler and loss centres into ``state``."""
    targets = {
        "student": state.student,
        "teacher": state.teacher,
        "optimizer": state.optimizer,
        "scaler": state.scaler,
        "loss": state.loss,
    }
    for key, target in targets.items():
        if key == "scaler" and not checkpoint.states[key]:
            continue  # saved without fp16 (a disabled scaler has no state): an fp16 resume starts a fresh scale
        try:
            target.load_state_dict(checkpoint.states[key])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(
                f"{checkpoint.path}: its {key} does not fit this run's configuration "
                f"(was it written with other model settings?): {error}"
            ) from None


def load_backbone(path: str, branch: str = "teacher") -> tuple[ADCLRVisionTransformer, TrainConfig]:
    """The ``branch`` backbone of the checkpoint at ``path``, in eval mode, and the run's config.

    The backbone uses the ``reference`` attention backend; ``backbone.set_attn_backend`` changes it.
    Raises ``CheckpointError`` for a file that is not a usable checkpoint.
    """
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    checkpoint = load_checkpoint(path)
    try:
        backbone = build_backbone(checkpoint.config, attn_backend="reference")
    except ValueError as error:
        raise CheckpointError(f"{path}: its config does not describe a backbone this code builds: {error}") from None
    prefix = "backbone."
    weights = {k[len(prefix) :]: v for k, v in checkpoint.states[branch].items() if k.startswith(prefix)}
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: the {branch} weights do not fit the backbone its config describes: {error}"
        ) from None
    return backbone.eval(), checkpoint.config


def _read(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CorruptCheckpointError(f"{path} is empty (truncated, or its write never happened)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a torn or foreign file fails anywhere inside torch.load
        found = re.search(r"GLOBAL (\S+)", str(error))
        if isinstance(error, pickle.UnpicklingError) and found:
            raise CheckpointError(
                f"{path} is not a checkpoint this code reads: it holds a Python object ({found.group(1)}), "
                "which is never unpickled"
            ) from None
        cause = error.__context__ if isinstance(error, pickle.UnpicklingError) and error.__context__ else error
        first_sentence = re.split(r"(?<=\.)\s|\n", str(cause).strip())[0].rstrip(".")
        raise CorruptCheckpointError(
            f"{path} cannot be read as a checkpoint (truncated, or not written by torch.save): "
            f"{type(cause).__name__}: {first_sentence}"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a checkpoint dict")
    return raw


def _require(raw: dict, path: str, keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in raw]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: it is incomplete or not a train.py checkpoint")


def _number(value: Any) -> Any:
    """History values as plain Python numbers (numpy scalars would need pickle to load)."""
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    return value
