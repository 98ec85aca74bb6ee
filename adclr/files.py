"""Files the product writes (checkpoints, exports, pictures, logs): atomically and with the user's umask."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Yield a file to write ``path``'s new content to; on success it replaces ``path`` in one rename.

    The content goes to a temporary file next to ``path``, is flushed to disk, then renamed over
    ``path``, so a crash mid-write never leaves a torn file (the old one stays); on an exception the
    temporary file is removed. It is created by ``open``, so it has the user's umask (``tempfile``'s
    files, and so anything renamed from them, would be 0600: unreadable to the rest of a group).
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
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
