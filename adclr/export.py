"""Export a trained backbone as a timm-compatible safetensors file.

    python -m adclr.export --checkpoint runs/adclr/checkpoint.pth --output backbone.safetensors

The file's metadata holds the ``timm.create_model`` arguments; ``load_exported`` rebuilds the model.
"""

from __future__ import annotations

import argparse
import json
import os

import timm
from safetensors import safe_open
from safetensors.torch import load_file, save

from .checkpoint import BRANCHES, load_backbone
from .cli import add_debug_flag, user_errors
from .errors import UserError
from .files import atomic_write
from .model import timm_create_kwargs

METADATA_KEY = "timm_create_kwargs"


def export(checkpoint: str, output: str, branch: str = "teacher") -> dict:
    """Write ``branch``'s backbone to ``output`` (atomically, with the user's umask); returns the timm
    arguments stored with it."""
    backbone, config = load_backbone(checkpoint, branch)
    kwargs = timm_create_kwargs(config.arch, config.patch_size, config.global_size)
    tensors = {name: t.contiguous() for name, t in backbone.state_dict().items()}
    # safetensors' save_file writes through a 0600 temporary file; its bytes go through atomic_write instead.
    data = save(tensors, metadata={METADATA_KEY: json.dumps(kwargs)})
    with atomic_write(output) as f:
        f.write(data)
    return kwargs


def load_exported(path: str):
    """A plain timm ``VisionTransformer`` with the exported weights (loaded with ``strict=True``)."""
    with safe_open(path, framework="pt") as f:
        kwargs = json.loads(f.metadata()[METADATA_KEY])
    model = timm.create_model(pretrained=False, **kwargs)
    model.load_state_dict(load_file(path), strict=True)
    return model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth written by train.py")
    parser.add_argument("--output", required=True, help="path of the .safetensors file to write")
    parser.add_argument("--branch", choices=BRANCHES, default="teacher", help="which network to export")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    with user_errors(args.debug):
        folder = os.path.dirname(os.path.abspath(args.output))
        if os.path.isdir(args.output):
            raise UserError(f"--output {args.output} is a folder; give the path of the file to write")
        if not os.path.isdir(folder):
            raise UserError(f"--output {args.output}: the folder {folder} does not exist")
        try:
            kwargs = export(args.checkpoint, args.output, args.branch)
        except PermissionError as error:
            raise UserError(f"--output {args.output}: cannot write there ({error.strerror})") from None
    print(f"wrote {args.output}; load it with adclr.export.load_exported or timm.create_model(**{kwargs})")


if __name__ == "__main__":
    main()
