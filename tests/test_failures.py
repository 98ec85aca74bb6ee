"""Failures the README promises one line for: a checkpoint that cannot be written (a full disk), an
optional package missing, Ctrl-C. Each ends in one line and a known exit status, never a traceback."""

import functools
import os
import signal
import subprocess
import sys

import pytest

from adclr.checkpoint import load_checkpoint
from adclr.lock import LOCK_NAME

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
TINY = ["--builtin_train_size", "32", "--builtin_test_size", "12", "--batch_size_per_gpu", "8", "--num_workers", "0"]
TINY += ["--out_dim", "64", "--head_hidden_dim", "32", "--head_bottleneck_dim", "16", "--local_crops_number", "1"]

# train.py where no file may grow past 64 KiB: every write beyond fails with EFBIG, as on a full disk a
# write fails with ENOSPC (torch's zip writer reports either as a RuntimeError chained to the OSError).
SMALL_FILES = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# train.py as it runs where the tensorboard package is not installed.
NO_TENSORBOARD = """
import runpy, sys
sys.modules["tensorboard"] = None  # import tensorboard raises ImportError
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def train(output_dir, *flags, launcher=(TRAIN,)):
    command = [sys.executable, *launcher, *TINY, "--output_dir", str(output_dir), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_ends_in_one_line_and_keeps_the_previous_one(tmp_path):
    run_dir = tmp_path / "run"
    first = train(run_dir, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    before = (run_dir / "checkpoint.pth").read_bytes()
    full = train(run_dir, "--epochs", "2", launcher=("-c", SMALL_FILES, TRAIN))
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert full.stderr.splitlines()[-1] == (
        f"error: cannot write {run_dir / 'checkpoint.pth'}: File too large (the previous file there is kept)"
    )
    assert (run_dir / "checkpoint.pth").read_bytes() == before and load_checkpoint(str(run_dir / "checkpoint.pth"))
    assert not [name for name in os.listdir(run_dir) if ".tmp." in name]


def test_tensorboard_without_the_package_is_refused_before_anything_runs(tmp_path):
    result = train(tmp_path / "run", "--tensorboard", launcher=("-c", NO_TENSORBOARD, TRAIN))
    assert result.returncode == 2
    assert result.stderr == (
        "error: --tensorboard needs the tensorboard package, which is not installed: pip install tensorboard\n"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_ctrl_c_ends_a_run_in_one_line_and_releases_its_folder(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, TRAIN, *TINY, "--output_dir", str(run_dir), "--epochs", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Ctrl-C's default disposition in the run, as in a terminal: a shell's background job (a CI step run
    # with `&`) inherits SIGINT ignored, and Python then never turns it into KeyboardInterrupt.
    restore_sigint = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=restore_sigint
    )
    for line in process.stdout:  # the run holds its folder and trains from here on
        if line.startswith("intra-op threads"):
            break
    while not (run_dir / LOCK_NAME).exists() or not (run_dir / LOCK_NAME).read_text():
        assert process.poll() is None, process.stderr.read()[-3000:]
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert stderr.splitlines()[-1] == "interrupted (Ctrl-C)" and "Traceback" not in stderr, stderr[-3000:]
    assert (run_dir / LOCK_NAME).read_text() == ""  # released: the next run starts without a note
