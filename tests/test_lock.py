"""One run per output folder: a second run is refused in one line naming the first; a killed run's lock
and half-written files do not block or litter the next one."""

import os
import signal
import subprocess
import sys

import pytest

from adclr.errors import OutputDirInUse
from adclr.lock import LOCK_NAME, hold_output_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLD = """
import sys, time
from adclr.lock import hold_output_dir
for note in hold_output_dir(sys.argv[1]):
    print("note:", note)
print("held", flush=True)
if sys.argv[2] == "wait":
    sys.stdin.read()  # until the test closes stdin (or kills this process)
"""


def hold(folder, wait: bool):
    """A process that locks ``folder`` (and, with ``wait``, keeps it until its stdin closes)."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), "wait" if wait else "exit"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = []
    while not lines or lines[-1] != "held":
        line = process.stdout.readline()
        assert line, f"the holder ended early: {lines}"
        lines.append(line.strip())
    return process, lines[:-1]


def test_a_second_holder_is_refused_naming_the_first_and_a_killed_one_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    first, notes = hold(folder, wait=True)
    assert notes == []
    try:
        with pytest.raises(
            OutputDirInUse, match=rf"--output_dir {folder} is in use by another run \(pid {first.pid} on "
        ):
            hold_output_dir(str(folder))
    finally:
        first.kill()  # kill -9: no clean-up runs
        first.wait()
    (folder / f"checkpoint.pth.tmp.{first.pid}").write_bytes(b"torn")  # a save the kill interrupted
    (folder / f"log.jsonl.tmp.{os.getpid()}").write_text("")  # a live process's file: kept
    second, notes = hold(folder, wait=False)
    second.wait()
    assert notes[0].startswith(f"note: --output_dir {folder}: the run that held it (pid {first.pid} on ")
    assert notes[1:] == [
        f"note: removed {folder / f'checkpoint.pth.tmp.{first.pid}'}, a half-written file of a killed run"
    ]
    assert sorted(os.listdir(folder)) == [LOCK_NAME, f"log.jsonl.tmp.{os.getpid()}"]
    third, notes = hold(folder, wait=False)  # the second ended cleanly: nothing to report
    assert notes == [] and third.wait() == 0


def test_train_refuses_a_folder_in_use_in_one_line(tmp_path):
    folder = tmp_path / "run"
    first, _ = hold(folder, wait=True)
    try:
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "train.py"), "--output_dir", str(folder), "--builtin_train_size", "32"],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait()
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(
        f"error: --output_dir {folder} is in use by another run (pid {first.pid} on "
    )  # the last line (torch may warn before it, e.g. of more loader workers than CPUs)
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(folder)) == [LOCK_NAME]  # nothing written
