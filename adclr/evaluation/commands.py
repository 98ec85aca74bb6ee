"""What the three evaluation commands (``python -m adclr.eval_knn``, ``eval_linear``, ``eval_seg``) share on
the command line: their common flags and checks, the backbone they load, the device (joining torchrun's
process group), the results file with its one-line summary, and bad input ending in one ``error:`` line."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..checkpoint import BRANCHES
from ..cli import INTERRUPTED
from ..distributed import DistInfo, init_distributed
from ..files import atomic_write
from .features import FrozenBackbone, load_frozen_backbone, positive


def command_parser(prog: str, description: str, image_size: int, batch_size: int) -> argparse.ArgumentParser:
    """The parser of command ``prog`` with the backbone, data and output flags every evaluation command takes."""
    parser = argparse.ArgumentParser(
        prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = parser.add_argument_group("backbone")
    model.add_argument(
        "--weights",
        required=True,
        help="a train.py checkpoint.pth, a .safetensors file from adclr.export, or (with --arch) timm weights",
    )
    model.add_argument("--which", choices=BRANCHES, default="teacher", help="network of a train.py checkpoint")
    model.add_argument(
        "--arch", help="timm model name whose weights --weights holds, e.g. vit_small_patch16_224.dino (no download)"
    )
    data = parser.add_argument_group("data and output")
    data.add_argument("--data_path", required=True, help="folder with train/ and val/")
    data.add_argument("--image_size", type=int, default=image_size, help="input side in pixels")
    data.add_argument("--batch_size_per_gpu", type=int, default=batch_size)
    workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    data.add_argument(
        "--num_workers", type=int, default=workers, help=f"data-loading processes per GPU (default: {workers} here)"
    )
    data.add_argument("--output_dir", default=".", help="where the results JSON goes")
    data.add_argument("--seed", type=int, default=0)
    return parser


def check_sizes(args: argparse.Namespace) -> None:
    """Refuse a common size flag below 1 (every command checks these first)."""
    positive("image_size", args.image_size)
    positive("batch_size_per_gpu", args.batch_size_per_gpu)


def check_image_size(backbone: FrozenBackbone, image_size: int, flag: str = "--image_size") -> None:
    """Refuse an input side that is not whole patches of ``backbone`` (timm would assert deep inside)."""
    patch = backbone.patch_size
    if image_size % patch:
        below, above = image_size - image_size % patch, image_size - image_size % patch + patch
        nearest = f"{below} or {above}" if below else str(above)
        raise ValueError(f"{flag} {image_size} must be a multiple of the backbone's patch size {patch}, e.g. {nearest}")


def load_backbone(args: argparse.Namespace) -> FrozenBackbone:
    """The backbone of ``--weights`` (``--which``, ``--arch``), refused unless ``--image_size`` is whole patches."""
    backbone = load_frozen_backbone(args.weights, args.which, args.arch)
    check_image_size(backbone, args.image_size)
    return backbone


def setup_device() -> tuple[torch.device, DistInfo]:
    """CUDA (the local rank's GPU under torchrun) when present, else the CPU; joins torchrun's process group."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist_info = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    return device, dist_info


def to_device(backbone: FrozenBackbone, args: argparse.Namespace) -> tuple[FrozenBackbone, dict, DistInfo]:
    """``backbone`` on this process's device (``setup_device``), the keyword arguments every protocol takes for
    where and how it reads the images (``batch_size``, ``device``, ``num_workers``, ``dist_info``), and the
    process's ``DistInfo``."""
    device, dist_info = setup_device()
    where = dict(batch_size=args.batch_size_per_gpu, device=device, num_workers=args.num_workers, dist_info=dist_info)
    return backbone.to(device), where, dist_info


def backbone_description(args: argparse.Namespace) -> dict:
    checkpoint = not args.arch and not args.weights.endswith(".safetensors")
    return {"weights": args.weights, "which": args.which if checkpoint else None, "arch": args.arch}


def report_header(args: argparse.Namespace, protocol: str) -> dict:
    """The first entries of every command's results: the protocol, the backbone, the data and the input side."""
    backbone = backbone_description(args)
    return {"protocol": protocol, "backbone": backbone, "data_path": args.data_path, "image_size": args.image_size}


def write_results(output_dir: str, name: str, results: dict) -> str:
    """``output_dir/name`` written atomically with the user's umask (NaN-free JSON); returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name)
    text = json.dumps(results, indent=2, allow_nan=False) + "\n"  # refuses NaN before the file is touched
    with atomic_write(path, "w") as f:
        f.write(text)
    return path


def publish(args: argparse.Namespace, name: str, report: dict, summary: str) -> dict:
    """Write ``report`` to ``--output_dir``/``name`` and print ``summary`` with the file's path; returns ``report``."""
    path = write_results(args.output_dir, name, report)
    print(f"{summary}; wrote {path}")
    return report


def run_command(parser: argparse.ArgumentParser, argv, body: Callable[[argparse.Namespace], None]) -> None:
    """Parse ``argv`` and run ``body``; bad input ends with one ``error:`` line and exit status 2."""
    args = parser.parse_args(argv)
    try:
        body(args)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(INTERRUPTED, "interrupted (Ctrl-C)\n")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
