"""One run per output folder: a lock held for the run's lifetime, and the leftovers of a killed run removed.

``hold_output_dir`` takes an exclusive ``flock`` on ``<output_dir>/.adclr.lock`` and writes the holder's
pid, host and start time into it. The kernel releases the lock whenever the process ends (an exception,
Ctrl-C, SIGTERM, kill -9), so a lock file nobody holds is stale by construction: the next run takes it
over. A clean exit empties the file, so a non-empty file found unlocked names a run that was killed;
half-written ``*.tmp.<pid>`` files (``adclr.files.atomic_write``) whose process is gone are removed
when the lock is taken. Torch-free.
"""

from __future__ import annotations

import atexit
import datetime
import fcntl
import os
import re
import socket

from .errors import OutputDirInUse

LOCK_NAME = ".adclr.lock"
_TEMPORARY = re.compile(r".+\.tmp\.(\d+)")


def hold_output_dir(output_dir: str, flag: str = "--output_dir") -> list[str]:
    """Create ``output_dir`` if needed and lock it until this process ends; returns notes for the log
    (a stale lock taken over, leftover temporary files removed). Raises ``OutputDirInUse`` naming the
    process that holds it."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that is starting"
        os.close(fd)
        raise OutputDirInUse(
            f"{flag} {output_dir} is in use by another run ({holder}); wait for it to end or choose another {flag}"
        ) from None
    notes = []
    previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if previous:
        notes.append(f"{flag} {output_dir}: the run that held it ({previous}) was killed; taking it over")
    for name in sorted(os.listdir(output_dir)):
        match = _TEMPORARY.fullmatch(name)
        if match and not _alive(int(match.group(1))):
            os.remove(os.path.join(output_dir, name))
            notes.append(f"removed {os.path.join(output_dir, name)}, a half-written file of a killed run")
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}".encode(), 0)
    atexit.register(_release, fd)
    return notes


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a temporary file of a live process, an evaluation say, is kept)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release(fd: int) -> None:
    """At a clean exit: empty the lock file (nobody was killed) and release the lock."""
    try:
        os.ftruncate(fd, 0)
        os.close(fd)
    except OSError:
        pass
