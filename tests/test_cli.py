"""The command line as users meet it: help and flag errors before torch loads, every value refused with
its flag and range, a user's mistake in one line with exit status 2 (a traceback only when asked for),
checks of the device and the data before anything is written, and files with the user's umask."""

import json
import os
import re
import stat
import subprocess
import sys

import pytest
import torch
from PIL import Image

from adclr.cli import DEBUG_ENV, user_errors
from adclr.config import BOUNDS, PAIRS, Bounds, preset_table
from adclr.data import ImageFiles
from adclr.errors import CheckpointError, ConfigError, DataError, UserError
from adclr.files import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
HEAVY = ("torch", "timm", "torchvision", "triton", "numpy", "PIL")

# train.py run as a user runs it; the last stdout line lists the heavy modules imported by the time it ended.
PROBE = f"""
import json, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})))
"""


def run_train(tmp_path, *flags, env=None):
    """``train.py flags`` in a fresh interpreter: exit status, stdout (without the probe's line), stderr, and the
    heavy modules it imported."""
    command = [sys.executable, "-c", PROBE, TRAIN, "--output_dir", str(tmp_path / "out"), *flags]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **(env or {})})
    *stdout, probe = result.stdout.splitlines()
    return result.returncode, "\n".join(stdout), result.stderr, json.loads(probe)


def test_help_answers_before_torch_is_imported(tmp_path):
    status, stdout, _, imported = run_train(tmp_path, "--help")
    assert status == 0 and imported == []
    assert preset_table() in stdout
    assert "--lambda_query LAMBDA_QUERY" in stdout and "a number >= 0; default: 0.5" in " ".join(stdout.split())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_query", "-1"], "argument --num_query: must be an integer >= 0, got '-1'"),
        (["--lambda_query", "-5"], "argument --lambda_query: must be a number >= 0, got '-5'"),
        (["--epochs", "0"], "argument --epochs: must be an integer >= 1, got '0'"),
        (["--batch_size_per_gpu", "0"], "argument --batch_size_per_gpu: must be an integer >= 1, got '0'"),
        (["--teacher_temp", "nan"], "argument --teacher_temp: must be a number in (0, 1], got 'nan'"),
        (["--lr", "inf"], "argument --lr: must be a number >= 0, got 'inf'"),
        (["--momentum_teacher", "1.01"], "argument --momentum_teacher: must be a number in [0, 1), got '1.01'"),
        (["--momentum_teacher", "1"], "argument --momentum_teacher: must be a number in [0, 1), got '1'"),
        (["--out_dim", "1"], "argument --out_dim: must be an integer >= 2, got '1'"),
        (["--teacher_temp", "100"], "argument --teacher_temp: must be a number in (0, 1], got '100'"),
        (
            ["--local_size", "56"],
            "argument --local_size: must be at most the global crops' size (--global_size 48), got 56",
        ),
        (["--min_lr", "0.01"], "argument --min_lr: must be at most the peak learning rate (--lr 0.002), got 0.01"),
        (["--query_scale", "0", "0.1"], "argument --query_scale: must be a number in (0, 1], got '0'"),
        (["--query_scale", "0.3", "0.1"], "argument --query_scale: must be (min, max) with min <= max, got (0.3, 0.1)"),
        (["--global_size", "36"], "argument --global_size: must be a multiple of the patch size (8), got 36"),
        (["--patch_size", "10"], "argument --global_size: must be a multiple of the patch size (10), got 48"),
        (["--query_keys", "bogus"], "argument --query_keys: invalid choice: 'bogus'"),
    ],
)
def test_bad_values_are_refused_before_torch_is_imported(tmp_path, flags, message):
    status, stdout, stderr, imported = run_train(tmp_path, *flags)
    assert (status, stdout, imported) == (2, "", [])
    assert stderr.splitlines()[-1].startswith(f"ADCLR: error: {message}")
    assert not (tmp_path / "out").exists()


def test_local_size_is_checked_only_when_local_crops_use_it(tmp_path):
    status, _, stderr, _ = run_train(tmp_path, "--local_size", "12")
    assert status == 2
    assert stderr.splitlines()[-1] == (
        "ADCLR: error: argument --local_size: must be a multiple of the patch size (8), got 12"
    )
    status, _, stderr, _ = run_train(tmp_path, "--local_size", "12", "--local_crops_number", "0", "--data_path", "none")
    assert status == 2 and stderr == "error: --data_path none does not exist\n"  # past the flags' checks


def out_of_range(bounds: Bounds) -> str:
    """A value just outside ``bounds`` (or of the wrong kind when it has no finite end)."""
    if bounds.low is not None:
        return str(bounds.low if bounds.low_open else bounds.low - 1)
    return "1.5" if bounds.integer else "nan"


def test_every_numeric_flag_parses_with_its_bounds(capsys):
    """Every field with a range is a flag that refuses a value just outside it, naming the flag and the range."""
    import runpy

    parser = runpy.run_path(TRAIN, run_name="train")["get_args_parser"]()
    for name, bounds in BOUNDS.items():
        args = [f"--{name}", out_of_range(bounds)] + (["0.5"] if name in PAIRS else [])
        with pytest.raises(SystemExit) as caught:
            parser.parse_args(args)
        assert caught.value.code == 2, name
        assert f"argument --{name}: must be {bounds}" in capsys.readouterr().err, name
        if bounds.high is not None:
            high = str(bounds.high if bounds.high_open else bounds.high + 1)
            with pytest.raises(SystemExit):
                parser.parse_args([f"--{name}", high] + (["0.5"] if name in PAIRS else []))
            assert f"argument --{name}: must be {bounds}" in capsys.readouterr().err, name
        low = bounds.low if bounds.low is not None and not bounds.low_open else 0.5
        assert vars(parser.parse_args([f"--{name}", str(low)] + ([str(low)] if name in PAIRS else [])))


@pytest.mark.parametrize(
    "bounds, accepted, refused",
    [
        (Bounds(integer=True, low=1), ["1", "7"], ["0", "-1", "1.0", "2.5", "one", ""]),
        (Bounds(integer=False, low=0), ["0", "0.0", "1e9"], ["-1e-9", "nan", "inf", "-inf", "x"]),
        (Bounds(integer=False, low=0, low_open=True), ["1e-12", "5"], ["0", "-0.0"]),
        (Bounds(integer=False, low=0, high=1, low_open=True), ["1", "0.5"], ["0", "1.0001"]),
        (Bounds(integer=False, low=0, high=1, high_open=True), ["0", "0.999"], ["1", "-0.1"]),
    ],
)
def test_bounds_parse_exactly_their_range(bounds, accepted, refused):
    import argparse

    for text in accepted:
        assert bounds.accepts(bounds.parse(text)), text
    for text in refused:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"must be {bounds}, got {text!r}")):
            bounds.parse(text)
    assert not bounds.accepts(True)  # a bool is not a number here, though Python says it is an int


def test_user_errors_end_in_one_line_with_status_2(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    for error in (UserError("--data_path x does not exist"), CheckpointError("c.pth is empty"), DataError("d")):
        with pytest.raises(SystemExit) as caught, user_errors():
            raise error
        assert caught.value.code == 2
        assert capsys.readouterr().err == f"error: {error}\n"
    assert issubclass(ConfigError, UserError)
    with pytest.raises(UserError), user_errors(debug=True):  # --debug: the traceback
        raise UserError("shown with its traceback")
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(UserError), user_errors():
        raise UserError("shown with its traceback")
    monkeypatch.setenv(DEBUG_ENV, "0")
    with pytest.raises(SystemExit), user_errors():
        raise UserError("one line")
    with pytest.raises(KeyError), user_errors():  # a bug is not the user's mistake: it keeps its traceback
        raise KeyError("bug")


@pytest.mark.parametrize(
    "data_path, output_dir, message",
    [
        ("missing", "out", "error: --data_path {tmp}/missing does not exist"),
        ("a_file", "out", "error: --data_path {tmp}/a_file is a file, not a folder"),
        (None, "a_file/out", "error: --output_dir {tmp}/a_file/out: {tmp}/a_file is a file, not a folder"),
    ],
)
def test_path_mistakes_end_in_one_line_before_torch_and_before_any_folder(tmp_path, data_path, output_dir, message):
    (tmp_path / "a_file").write_text("not a folder")
    flags = ["--output_dir", str(tmp_path / output_dir)]
    if data_path:
        flags += ["--data_path", str(tmp_path / data_path)]
    status, stdout, stderr, imported = run_train(tmp_path, *flags)
    assert (status, stdout, imported) == (2, "", [])
    assert stderr == message.format(tmp=tmp_path) + "\n"
    assert not (tmp_path / "out").exists()
    status, _, stderr, _ = run_train(tmp_path, *flags, "--debug")
    assert status == 1 and "Traceback" in stderr and "adclr.errors.UserError" in stderr


def write_images(folder, good: int, broken: int) -> None:
    folder.mkdir()
    for i in range(good):
        Image.new("RGB", (24, 24), (40 * i, 0, 0)).save(folder / f"good{i}.png")
    for i in range(broken):
        (folder / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")


def test_image_files_count_only_images(tmp_path):
    write_images(tmp_path / "flat", good=3, broken=2)
    with pytest.warns(UserWarning, match=r"leaving out 2 of 5 files that are not images: broken0.jpg"):
        dataset = ImageFiles(str(tmp_path / "flat"))
    assert len(dataset) == 3 and {os.path.basename(p) for p, _ in dataset.samples} == {f"good{i}.png" for i in range(3)}
    assert len(ImageFiles(str(tmp_path / "flat"), check_limit=4)) == 5  # larger folders: skipped when met
    write_images(tmp_path / "none", good=0, broken=2)
    with pytest.raises(DataError, match=r"none of its 2 image files can be read, e.g. broken0.jpg"):
        ImageFiles(str(tmp_path / "none"))
    with pytest.raises(DataError, match="does not exist"):
        ImageFiles(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="is a file"):
        ImageFiles(str(tmp_path / "flat" / "good0.png"))


@pytest.mark.parametrize(
    "good, broken, flags, message",
    [
        (0, 2, [], "error: data_path {data}: none of its 2 image files can be read, e.g. broken0.jpg"),
        (3, 2, ["--batch_size_per_gpu", "4"], "error: --data_path {data} has 3 images, fewer than one batch of 4"),
    ],
)
def test_data_mistakes_end_in_one_line_before_the_output_folder(tmp_path, good, broken, flags, message):
    write_images(tmp_path / "images", good, broken)
    status, _, stderr, _ = run_train(tmp_path, "--data_path", str(tmp_path / "images"), "--preset", "builtin", *flags)
    assert status == 2 and "Traceback" not in stderr
    assert stderr.splitlines()[-1].startswith(message.format(data=tmp_path / "images"))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusals")
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--attn_backend", "triton"], "error: --attn_backend triton needs a CUDA GPU and there is none"),
        (["--precision", "fp16"], "error: --precision fp16 needs a CUDA GPU"),
    ],
)
def test_what_the_device_cannot_run_is_refused_at_start_up(tmp_path, flags, message):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, TRAIN, "--output_dir", str(tmp_path / "out"), *flags]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(message)
    assert "preset builtin" not in result.stdout and not (tmp_path / "out").exists()  # before anything else


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_files_are_written_atomically_with_the_users_umask(tmp_path, umask, mode):
    path = tmp_path / "result.json"
    old = os.umask(umask)
    try:
        with atomic_write(str(path), "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode and path.read_text() == "{}"
    with pytest.raises(RuntimeError, match="interrupted"), atomic_write(str(path), "w") as f:
        f.write('{"half": ')
        raise RuntimeError("interrupted")
    assert path.read_text() == "{}" and os.listdir(tmp_path) == ["result.json"]


def test_the_export_gets_the_users_umask(tmp_path):
    from engine_utils import CPU, tiny_config

    from adclr import train_step
    from adclr.checkpoint import save_checkpoint
    from adclr.export import export, load_exported

    config = tiny_config()
    save_checkpoint(str(tmp_path / "checkpoint.pth"), train_step.build_train_state(config, CPU), config, 1, [])
    old = os.umask(0o022)
    try:
        export(str(tmp_path / "checkpoint.pth"), str(tmp_path / "backbone.safetensors"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "backbone.safetensors").stat().st_mode) == 0o644  # safetensors alone: 0600
    assert load_exported(str(tmp_path / "backbone.safetensors")).embed_dim == 96


def test_export_and_visualize_end_user_errors_in_one_line(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"")
    commands = {
        ("adclr.export", "--checkpoint", "missing.pth", "--output", "x.safetensors"): "error: missing.pth: no such "
        "checkpoint file",
        ("adclr.export", "--checkpoint", "bad.pth", "--output", "nowhere/x.safetensors"): "error: --output "
        f"nowhere/x.safetensors: the folder {tmp_path}/nowhere does not exist",
        ("adclr.visualize", "--checkpoint", "bad.pth"): "error: bad.pth is empty",
        ("adclr.visualize", "--checkpoint", "bad.pth", "--image", "bad.pth"): "error: --image bad.pth cannot be read",
        ("adclr.visualize", "--checkpoint", "bad.pth", "--num_query", "-2"): "error: argument --num_query: must be an "
        "integer >= 0, got '-2'",
    }
    for command, message in commands.items():
        result = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, command
        assert result.stderr.splitlines()[-1].split("visualize.py: ")[-1].startswith(message), (command, result.stderr)


def test_the_readme_test_command_is_what_ci_runs():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    (documented,) = [line.split(" && ")[-1] for line in readme.splitlines() if "python -m pytest" in line]
    (run,) = [line for line in ci.splitlines() if line.startswith("python -m pytest")]
    assert documented == run and "--durations=15" in run


def test_eval_folders_are_checked_before_training(tmp_path):
    """--eval_data_path: train/ and val/ with the same, non-empty class folders of readable images, or one clear
    UserError."""
    from adclr.cli import require_eval_folders
    from adclr.errors import UserError

    for split, classes in (("train", ("cat", "dog")), ("val", ("cat", "dog"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "0.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image, not listed: no reason to refuse")
    require_eval_folders(str(tmp_path), "--eval_data_path")
    bad = tmp_path / "train" / "cat" / "1.png"
    bad.write_bytes(b"not a png")  # found now, not after training
    with pytest.raises(UserError, match=rf"^--eval_data_path: {bad} is not an image \(cannot identify image file"):
        require_eval_folders(str(tmp_path), "--eval_data_path")
    bad.unlink()
    (tmp_path / "val" / "dog" / "0.png").unlink()
    with pytest.raises(UserError, match=r"val/dog holds no file"):
        require_eval_folders(str(tmp_path), "--eval_data_path")
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "bird")
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "bird" / "0.png")
    with pytest.raises(UserError, match=r"only in train: \['dog'\], only in val: \['bird'\]"):
        require_eval_folders(str(tmp_path), "--eval_data_path")
    with pytest.raises(UserError, match="has no train/ folder"):
        require_eval_folders(str(tmp_path / "train"), "--eval_data_path")
    with pytest.raises(UserError, match="does not exist"):
        require_eval_folders(str(tmp_path / "missing"), "--eval_data_path")


@pytest.mark.parametrize(
    "backend, precision, device, capability, outcome",
    [
        ("triton", "fp32", "cpu", None, "needs a CUDA GPU"),
        ("auto", "fp16", "cpu", None, "fp16 needs a CUDA GPU"),
        ("auto", "bf16", "cpu", None, "note: bf16 matrix units"),
        ("triton", "bf16", "cuda", (7, 0), "compute capability 8.0 or newer"),
        ("auto", "bf16", "cuda", (7, 0), "note: emulated"),
        ("triton", "bf16", "cuda", (9, 0), "fine"),
        ("auto", "fp16", "cuda", (7, 0), "fine"),
    ],
)
def test_device_checks(backend, precision, device, capability, outcome):
    """What a device cannot run is refused at start-up; what runs but is probably not meant gets a note."""
    from adclr.cli import check_device
    from adclr.config import make_config
    from adclr.errors import UserError

    cfg = make_config(attn_backend=backend, precision=precision)
    if outcome.startswith("note: "):
        notes = check_device(cfg, device, capability, interpreter=False)
        assert len(notes) == 1 and outcome[len("note: ") :] in notes[0]
    elif outcome == "fine":
        assert check_device(cfg, device, capability, interpreter=False) == []
    else:
        with pytest.raises(UserError, match=outcome):
            check_device(cfg, device, capability, interpreter=False)
    assert check_device(make_config(attn_backend="triton"), "cpu", None, interpreter=True) == []


@pytest.mark.parametrize(
    "settings, device, capability, interpreter, outcome",
    [
        (dict(loss_backend="triton"), "cpu", None, False, "--loss_backend triton needs a CUDA GPU"),
        (dict(loss_backend="triton"), "cpu", None, True, "fine"),
        (dict(loss_backend="triton", fused_loss=False), "cpu", None, False, "fine"),  # the unfused loss has no rows
        (dict(loss_backend="torch"), "cpu", None, False, "fine"),
        (
            dict(loss_backend="triton", precision="bf16"),
            "cuda",
            (7, 0),
            False,
            "--loss_backend triton with --precision",
        ),
        (dict(loss_backend="triton", precision="bf16"), "cuda", (8, 0), False, "fine"),
    ],
)
def test_loss_backend_device_checks(settings, device, capability, interpreter, outcome):
    """The fused loss's Triton rows are refused where they cannot run, as the attention kernel is."""
    from adclr.cli import check_device
    from adclr.config import make_config
    from adclr.errors import UserError

    cfg = make_config(**settings)
    if outcome == "fine":
        assert check_device(cfg, device, capability, interpreter) == []
    else:
        with pytest.raises(UserError, match=outcome):
            check_device(cfg, device, capability, interpreter)


def test_default_precision_follows_the_gpu(monkeypatch):
    """bf16 where the GPU has bf16 matrix units (sm80+), fp16 on older GPUs (V100), fp32 on CPU."""
    from adclr import train_step

    assert train_step.default_precision(torch.device("cpu")) == "fp32"
    for capability, expected in (((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert train_step.default_precision(torch.device("cuda", 0)) == expected
