"""Export a trained backbone as a timm-compatible safetensors file.

    python -m adclr.export --checkpoint runs/adclr/checkpoint.pth --output backbone.safetensors

The file's metadata holds the ``timm.create_model`` arguments; ``load_exported`` rebuilds the model.
"""

from __future__ import annotations

import argparse
import json

import timm
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .checkpoint import BRANCHES, load_backbone
from .model import timm_create_kwargs

METADATA_KEY = "timm_create_kwargs"


def export(checkpoint: str, output: str, branch: str = "teacher") -> dict:
    """Write ``branch``'s backbone to ``output``; returns the timm arguments stored with it."""
    backbone, config = load_backbone(checkpoint, branch)
    kwargs = timm_create_kwargs(config.arch, config.patch_size, config.global_size)
    tensors = {name: t.contiguous() for name, t in backbone.state_dict().items()}
    save_file(tensors, output, metadata={METADATA_KEY: json.dumps(kwargs)})
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
    args = parser.parse_args(argv)
    kwargs = export(args.checkpoint, args.output, args.branch)
    print(f"wrote {args.output}; load it with adclr.export.load_exported or timm.create_model(**{kwargs})")


if __name__ == "__main__":
    main()
