"""The user's mistakes: every error a command reports in one line (``adclr.cli.user_errors``) and exit 2.

A ``UserError`` is a problem with what the user asked for (a value, a path, a data folder, a
checkpoint), never a bug; its message says what and how to fix it. Torch-free, so that a command line
and a config are checked before torch loads.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with what the user asked for; its message says what and how to fix it, in one line."""


class ConfigError(UserError):
    """A config value out of its accepted range; ``field`` names the field (and the flag ``--{field}``)."""

    def __init__(self, name: str, message: str):
        self.field, self.message = name, message
        super().__init__(f"{name} {message}")


class DataError(UserError):
    """A data folder that cannot be trained on: missing, not a folder, or without readable images."""


class CheckpointError(UserError):
    """A file that is not a checkpoint this code can use; the message names the file and says why."""


class CorruptCheckpointError(CheckpointError):
    """A file that cannot be read at all: empty, truncated, or not written by ``torch.save``."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (a full disk, a quota, a file-size limit); the old file is kept."""


class OutputDirInUse(UserError):
    """Another process holds the output folder's lock."""
