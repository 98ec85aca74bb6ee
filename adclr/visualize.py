"""Pictures of the last block's attention, as DINO's visualize_attention.py, plus ADCLR's query tokens.

    python -m adclr.visualize --checkpoint runs/adclr/checkpoint.pth --output_dir pictures
    python -m adclr.visualize --checkpoint ... --image photo.jpg --num_query 6

The network sees the image at the run's size (``global_size``); every tile shows it upscaled by a whole
factor to at least 224 px, with attention maps (one value per patch, drawn as blocks) overlaid in red
to yellow. Writes

* ``cls_attention.png``: the image, then the CLS token's attention over the patches averaged over heads,
  then for each head;
* ``query_attention.png``: the image with every query crop's box (numbered), then for each query token
  the map of where it attends (averaged over heads) with the box its crop was cut from.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.utils import draw_bounding_boxes, make_grid, save_image

from .augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation, MultiCropConfig
from .checkpoint import BRANCHES, load_backbone
from .cli import add_debug_flag, user_errors
from .config import BOUNDS, Bounds
from .data import SyntheticScenes
from .errors import UserError
from .files import atomic_write

MIN_TILE = 224  # pixels: the smallest side a tile is shown at
BOX_COLOUR = (0, 255, 255)  # cyan: never produced by the red-to-yellow overlay


def heat_overlay(image: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """``image`` [3, H, W] in [0, 1] dimmed, with ``heat`` [H, W] (scaled to [0, 1]) as red-to-yellow on top."""
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    colour = torch.stack([heat.clamp(0, 0.5) * 2, (heat - 0.5).clamp(0, 0.5) * 2, torch.zeros_like(heat)])
    return (0.35 * image + 0.65 * colour).clamp(0, 1)


def draw_boxes(tile: torch.Tensor, boxes: torch.Tensor, labels: list[str] | None = None) -> torch.Tensor:
    """``tile`` [3, D, D] in [0, 1] with ``boxes`` ([n, 4] x0, y0, x1, y1 in its pixels) drawn in ``BOX_COLOUR``."""
    width = max(2, tile.shape[-1] // 112)
    drawn = draw_bounding_boxes((tile * 255).round().to(torch.uint8), boxes, labels, colors=BOX_COLOUR, width=width)
    return drawn.float() / 255


@dataclass
class AttentionTiles:
    """The pictures of one image, each ``[3, D, D]`` in [0, 1] with ``D = factor * size >= 224``."""

    image: torch.Tensor  # the network's view, upscaled
    boxes: torch.Tensor  # [Q, 4] each query crop's box in tile pixels (x0, y0, x1, y1, inclusive)
    cls_mean: torch.Tensor  # the CLS token's attention averaged over heads, overlaid
    cls_heads: list[torch.Tensor]  # the CLS token's attention of each head, overlaid
    queries: list[torch.Tensor]  # each query token's attention (averaged over heads), overlaid, with its box


@torch.no_grad()
def attention_tiles(
    backbone,
    image: Image.Image,
    size: int,
    patch: int,
    num_query: int,
    query_scale: tuple[float, float] = MultiCropConfig.query_scale,
) -> AttentionTiles:
    """Run ``backbone`` on ``image`` resized to ``size`` with ``num_query`` random query crops of
    ``query_scale`` (area range, as in training; torch's RNG) and render its last block's CLS and query
    attention."""
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    pixels = v2.functional.to_dtype(v2.functional.to_image(image), torch.float32, scale=True).as_subclass(torch.Tensor)
    views = v2.functional.normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)[None]
    augment = MultiCropAugmentation(
        MultiCropConfig(num_query=num_query, query_scale=query_scale, patch_size=patch, local_crops_number=0)
    )
    boxes = augment.query_boxes(image)  # [Q, 4] top, left, height, width in view pixels
    query_crops = augment.crop_queries(image, boxes)
    probs, layout = backbone.last_attention(views, query_crops[None] if num_query else None)
    P, R, grid = layout.num_prefix, layout.num_raw, size // patch

    factor = math.ceil(MIN_TILE / size)
    shown = size * factor
    upscaled = v2.functional.resize(pixels, [shown, shown], InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)

    def overlays(weights: torch.Tensor) -> list[torch.Tensor]:  # [n, patches] -> n tiles, one block per patch
        maps = F.interpolate(weights.reshape(-1, 1, grid, grid).float(), size=(shown, shown), mode="nearest")
        return [heat_overlay(upscaled, m[0]) for m in maps]

    top, left, height, width = (boxes * factor).unbind(-1)
    xyxy = torch.stack([left, top, left + width - 1, top + height - 1], dim=-1)
    cls = probs[0, :, 0, P:R]  # [heads, patches]
    query_maps = overlays(probs[0, :, R:, P:R].mean(0)) if num_query else []
    return AttentionTiles(
        image=upscaled,
        boxes=xyxy,
        cls_mean=overlays(cls.mean(0, keepdim=True))[0],
        cls_heads=overlays(cls),
        queries=[draw_boxes(tile, box[None]) for tile, box in zip(query_maps, xyxy)],
    )


def attention_pictures(
    backbone,
    image: Image.Image,
    size: int,
    patch: int,
    num_query: int,
    output_dir: str,
    query_scale: tuple[float, float] = MultiCropConfig.query_scale,
) -> list[str]:
    """Write ``cls_attention.png`` (and ``query_attention.png`` with query crops) of ``attention_tiles``
    to ``output_dir``; returns their paths."""
    tiles = attention_tiles(backbone, image, size, patch, num_query, query_scale)
    pictures = {"cls_attention.png": make_grid([tiles.image, tiles.cls_mean, *tiles.cls_heads], nrow=8, pad_value=1)}
    if num_query:
        labelled = draw_boxes(tiles.image, tiles.boxes, [str(i + 1) for i in range(num_query)])
        pictures["query_attention.png"] = make_grid([labelled, *tiles.queries], nrow=4, pad_value=1)
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for name, grid in pictures.items():
        paths.append(os.path.join(output_dir, name))
        with atomic_write(paths[-1]) as f:
            save_image(grid, f, format="png")
    return paths


def main(argv=None) -> None:
    count = Bounds(integer=True, low=0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth written by train.py")
    parser.add_argument("--image", help="an image file (default: a built-in scene)")
    parser.add_argument("--builtin_index", type=count.parse, default=0, help="which built-in test image to show")
    parser.add_argument(
        "--num_query", type=count.parse, help="query crops to place on the image (default: the run's number)"
    )
    parser.add_argument("--branch", choices=BRANCHES, default="teacher")
    parser.add_argument("--seed", type=BOUNDS["seed"].parse, default=0, help="seed of the query-crop positions")
    parser.add_argument("--output_dir", default="pictures")
    add_debug_flag(parser)
    args = parser.parse_args(argv)

    with user_errors(args.debug):
        if args.image:
            try:
                image = Image.open(args.image)
                image.load()
            except OSError as error:  # PIL.UnidentifiedImageError is one
                raise UserError(f"--image {args.image} cannot be read as an image: {error}") from None
        backbone, run = load_backbone(args.checkpoint, args.branch)
        if not args.image:
            scenes = SyntheticScenes(args.builtin_index + 1, run.global_size, "test", run.seed)
            image = v2.functional.to_pil_image(scenes.generate(args.builtin_index)[0])
        num_query = run.num_query if args.num_query is None else args.num_query
        torch.manual_seed(args.seed)
        try:
            paths = attention_pictures(
                backbone, image, run.global_size, run.patch_size, num_query, args.output_dir, run.data.query_scale
            )
        except OSError as error:
            raise UserError(f"--output_dir {args.output_dir}: cannot write the pictures there ({error})") from None
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
