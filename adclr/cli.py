"""What the commands share: a user's mistake ends with one line and exit status 2, not a traceback.

A ``UserError`` (``adclr.errors``) is a problem with what the user asked for: a value, a path, a
data folder, a checkpoint. Commands run under ``user_errors(debug)``, which prints
``error: <message>`` to stderr and exits with status 2 (argparse's status for a bad flag); ``--debug``
or ``ADCLR_DEBUG=1`` shows the traceback instead. Any other exception is a bug and keeps its traceback.

Torch-free, like ``adclr.config``: ``train.py`` checks its flags and paths before importing torch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from .errors import UserError

DEBUG_ENV = "ADCLR_DEBUG"


def add_debug_flag(parser: argparse.ArgumentParser, **kwargs) -> None:
    parser.add_argument(
        "--debug", action="store_true", help=f"show the traceback of an error (or set {DEBUG_ENV}=1)", **kwargs
    )


def parse_bool(text: str) -> bool:
    """``argparse`` type of a true/false flag: true, false, 1 or 0."""
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def debugging(debug: bool = False) -> bool:
    """Whether tracebacks are wanted: ``--debug`` given or ``ADCLR_DEBUG`` set to anything but 0."""
    return debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")


INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)


@contextlib.contextmanager
def user_errors(debug: bool = False):
    """Run the block; a ``UserError`` prints ``error: <message>`` and exits 2, Ctrl-C prints one line and
    exits 130 (both re-raised when debugging)."""
    try:
        yield
    except UserError as error:
        if debugging(debug):
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if debugging(debug):
            raise
        print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED) from None


def require_package(name: str, flag: str) -> None:
    """``flag`` needs the optional package ``name``: refuse it at start-up rather than fail mid-run."""
    import importlib

    try:
        importlib.import_module(name)
    except ImportError:
        raise UserError(f"{flag} needs the {name} package, which is not installed: pip install {name}") from None


def check_device(cfg, device_type: str, capability: tuple[int, int] | None, interpreter: bool) -> list[str]:
    """What the run's config ``cfg`` asks of the device (``capability``: the CUDA GPU's, None on CPU),
    checked before any data is read: raises ``UserError`` for what cannot run here, returns notes on what
    runs but is likely not what was meant."""
    backend, precision = cfg.model.attn_backend, cfg.optim.precision
    loss_backend = cfg.loss.loss_backend if cfg.loss.fused_loss else None  # the unfused loss has no row kernel
    if backend == "triton" and device_type != "cuda" and not interpreter:
        raise UserError(
            "--attn_backend triton needs a CUDA GPU and there is none (on CPU the Triton kernel runs only "
            "under TRITON_INTERPRET=1, for tests); use --attn_backend auto (the exact SDPA fallback here) or sdpa"
        )
    if loss_backend == "triton" and device_type != "cuda" and not interpreter:
        raise UserError(
            "--loss_backend triton needs a CUDA GPU and there is none (on CPU the Triton rows run only under "
            "TRITON_INTERPRET=1, for tests); use --loss_backend auto (PyTorch here) or torch"
        )
    if precision == "fp16" and device_type != "cuda":
        raise UserError(
            "--precision fp16 needs a CUDA GPU: on CPU fp16 autocast is about 2x slower than fp32 and its "
            "gradient scaler skips the first steps (a short run never updates); use --precision fp32 "
            "(the CPU default) or bf16"
        )
    if precision == "bf16" and device_type != "cuda":
        return ["--precision bf16 on CPU runs, but is faster than fp32 only on CPUs with bf16 matrix units"]
    from .kernels.device import supports_bf16  # only here: the flags are checked before torch loads

    if precision == "bf16" and not supports_bf16(capability):
        for flag, value in (("--attn_backend", backend), ("--loss_backend", loss_backend)):
            if value == "triton":
                raise UserError(
                    f"{flag} triton with --precision bf16 needs a GPU of compute capability 8.0 or newer "
                    f"(this one is {capability[0]}.{capability[1]}); use --precision fp16 (the default here) or "
                    f"{flag} auto"
                )
        return [f"bf16 is emulated on this GPU (compute capability {capability[0]}.{capability[1]}); fp16 is faster"]
    return []


SEGMENTATION_LAYOUT = {"images", "masks"}  # the sub-folders of a segmentation split (adclr.data.SegmentationFolder)


def not_a_segmentation_split(folder: str, classes, flag: str) -> None:
    """Refuse ``folder`` as an ImageFolder tree when its only "classes" are ``images`` and ``masks``: a
    k-NN would take them for two classes and score near 100 %."""
    if set(classes) == SEGMENTATION_LAYOUT:
        raise UserError(
            f"{flag} {folder} holds images/ and masks/, a segmentation folder (python -m adclr.eval_seg reads it); "
            "k-NN and the linear probe need ImageFolder trees, one sub-folder of images per class"
        )


def require_folder(path: str, flag: str) -> None:
    """``path`` (given as ``flag``) must be an existing folder."""
    if not os.path.exists(path):
        raise UserError(f"{flag} {path} does not exist")
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path} is a file, not a folder")


def require_eval_folders(path: str, flag: str) -> None:
    """``path`` (given as ``flag``) must hold ``train/`` and ``val/`` ImageFolder trees with the same class
    sub-folders, none of them empty (the images themselves are read when the evaluation runs)."""
    require_folder(path, flag)
    classes = []
    for split in ("train", "val"):
        folder = os.path.join(path, split)
        if not os.path.isdir(folder):
            raise UserError(f"{flag} {path} has no {split}/ folder; expected train/ and val/ ImageFolder trees")
        classes.append({entry.name for entry in os.scandir(folder) if entry.is_dir()})
        not_a_segmentation_split(folder, classes[-1], flag)
        if not classes[-1]:
            raise UserError(f"{flag} {folder} has no class sub-folders (ImageFolder layout: <class>/<image>)")
        for name in sorted(classes[-1]):
            with os.scandir(os.path.join(folder, name)) as entries:
                if not any(entry.is_file() for entry in entries):
                    raise UserError(f"{flag} {os.path.join(folder, name)} holds no file: every class needs images")
    if classes[0] != classes[1]:
        only_train, only_val = sorted(classes[0] - classes[1])[:5], sorted(classes[1] - classes[0])[:5]
        raise UserError(
            f"{flag} {path}: train/ and val/ must have the same class folders; "
            f"only in train: {only_train or 'none'}, only in val: {only_val or 'none'}"
        )
    _require_readable_images(path, flag)


def _require_readable_images(path: str, flag: str, limit: int = 10_000) -> None:
    """Every image file (by extension, as the evaluation lists them) of ``path``'s class folders must read
    as an image (its header: about 0.2 ms a file) when they hold at most ``limit`` files: the evaluation
    scores every image, and a bad one found after training would stop the run there. Larger folders
    are read when evaluated."""
    from PIL import Image  # only here: the checks above answer before any heavy import
    from torchvision.datasets.folder import IMG_EXTENSIONS

    files = []
    for split in ("train", "val"):
        for entry in sorted(os.scandir(os.path.join(path, split)), key=lambda e: e.name):
            if entry.is_dir():
                for root, _, names in os.walk(entry.path, followlinks=True):
                    files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
            if len(files) > limit:
                return
    for file in files:
        try:
            with Image.open(file):
                pass
        except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for a file that is no image
            raise UserError(f"{flag}: {file} is not an image ({error}); the evaluation scores every file") from None


def require_writable_folder(path: str, flag: str) -> None:
    """``path`` (given as ``flag``) must be a folder this process can write, or creatable as one."""
    existing = path
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing.rstrip(os.sep)) or "."
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write in {existing}")
