"""Checkpoints: one versioned format, written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of tensors and plain containers, saved with ``torch.save`` and read with
``torch.load(weights_only=True)``::

    {"format": "adclr-checkpoint", "version": 1,
     "config": TrainConfig.to_dict(),          # plain dict, see adclr.config
     "epoch": completed epochs, "history": [one dict of floats per epoch],
     "student": state_dict, "teacher": state_dict, "optimizer": state_dict, "scaler": state_dict,
     "loss": state_dict}                       # the loss centres

Files this repository wrote before the format had a version (a flat ``args`` dict of the command
line and a ``random_init`` backbone) are converted when read; anything else is refused with a
``CheckpointError`` that names the file and says why.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import PRESETS, TrainConfig, default_preset, make_config
from .engine import TrainState, build_backbone
from .model import ADCLRVisionTransformer

FORMAT = "adclr-checkpoint"
VERSION = 1
BRANCHES = ("teacher", "student")
STATE_KEYS = ("student", "teacher", "optimizer", "scaler", "loss")

# Unversioned checkpoints hold the optimizer's learning rate and weight decay as numpy float64
# scalars; these constructors rebuild such scalars and nothing else.
_numpy_core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
_LEGACY_SAFE_GLOBALS = [_numpy_core.multiarray.scalar, np.dtype, type(np.dtype(np.float64))]


class CheckpointError(ValueError):
    """A file that is not a checkpoint this code can use; the message names the file and says why."""


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
    """Write ``payload`` so that a crash mid-write never leaves a torn file: a temporary file next to
    ``path`` (created with the user's umask), flushed to disk, then renamed over ``path``."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def load_checkpoint(path: str) -> Checkpoint:
    """Read ``path`` (any format version this code knows, or an unversioned one); raises ``CheckpointError``."""
    raw = _read(path)
    if "format" in raw:
        if raw["format"] != FORMAT:
            raise CheckpointError(f"{path} is a {raw['format']!r} file, not an {FORMAT!r}")
        version = raw.get("version")
        if not isinstance(version, int) or not 1 <= version <= VERSION:
            raise CheckpointError(
                f"{path} has format version {version!r}; this code reads versions 1 to {VERSION} "
                "(a newer adclr wrote it?)"
            )
        _require(raw, path, ("config", "epoch", "history", *STATE_KEYS))
        try:
            config = TrainConfig.from_dict(raw["config"])
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{path} holds an unusable config: {error}") from None
    elif "args" in raw:
        _require(raw, path, ("args", "epoch", "history", *STATE_KEYS))
        config = _config_from_legacy_args(raw["args"], path)
        for group in raw["optimizer"].get("param_groups", []):  # numpy scalars -> floats
            group.update({key: float(v) for key, v in group.items() if isinstance(v, np.floating)})
    else:
        raise CheckpointError(f"{path} is not a train.py checkpoint (its keys are {list(raw)[:10]})")
    return Checkpoint(path, config, raw["epoch"], raw["history"], {key: raw[key] for key in STATE_KEYS})


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
    try:
        # torch 2.4 has no scoped allowlist: there, unversioned files are refused as holding other objects.
        allow = getattr(torch.serialization, "safe_globals", lambda _: contextlib.nullcontext())
        with allow(_LEGACY_SAFE_GLOBALS):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"a Python object ({found.group(1)})" if found else "Python objects other than tensors and containers"
        raise CheckpointError(
            f"{path} is not a checkpoint this code reads: it holds {what}, which is never unpickled"
        ) from None
    except Exception as error:  # noqa: BLE001 - a torn or foreign file fails anywhere inside torch.load
        raise CheckpointError(
            f"{path} cannot be read as a checkpoint (truncated, or not written by torch.save): "
            f"{type(error).__name__}: {error}"
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a checkpoint dict")
    return raw


def _require(raw: dict, path: str, keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in raw]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: it is incomplete or not a train.py checkpoint")


def _config_from_legacy_args(args: Any, path: str) -> TrainConfig:
    """The config of an unversioned checkpoint, from its flat dict of command-line values."""
    if not isinstance(args, dict):
        raise CheckpointError(f"{path}: its 'args' is a {type(args).__name__}, not a dict of command-line values")
    preset = default_preset(args.get("data_path"))
    missing = sorted(set(PRESETS[preset]) - set(args))
    if missing:
        raise CheckpointError(f"{path} is an unversioned checkpoint without the settings {missing}; cannot convert it")
    try:
        return make_config(preset, **args)
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"{path} is an unversioned checkpoint whose settings cannot be converted: {error}"
        ) from None


def _number(value: Any) -> Any:
    """History values as plain Python numbers (numpy scalars would need pickle to load)."""
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    return value
