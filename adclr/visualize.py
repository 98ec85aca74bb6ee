"""Pictures of the last block's attention, as DINO's visualize_attention.py, plus ADCLR's query tokens.

    python -m adclr.visualize --checkpoint runs/adclr/checkpoint.pth --output_dir pictures
    python -m adclr.visualize --checkpoint ... --image photo.jpg --num_query 6

Writes ``cls_attention.png`` (the image, then the CLS token's attention over the patches for each
head) and ``query_attention.png`` (each query crop's box on the image, then where that query token
attends, averaged over heads).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from torchvision.utils import draw_bounding_boxes, make_grid, save_image

from .augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation, MultiCropConfig
from .checkpoint import BRANCHES, load_backbone
from .data import SyntheticShapes


def heat_overlay(image: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """``image`` [3, H, W] in [0, 1] dimmed, with ``heat`` [H, W] (scaled to [0, 1]) as red-to-yellow on top."""
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    colour = torch.stack([heat.clamp(0, 0.5) * 2, (heat - 0.5).clamp(0, 0.5) * 2, torch.zeros_like(heat)])
    return (0.35 * image + 0.65 * colour).clamp(0, 1)


@torch.no_grad()
def attention_pictures(
    backbone, image: Image.Image, size: int, patch: int, num_query: int, output_dir: str
) -> list[str]:
    """Render the CLS and query attention of ``backbone``'s last block on ``image``; returns the PNG paths."""
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    to_unit = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    pixels = to_unit(image)
    views = v2.functional.normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)[None]
    augment = MultiCropAugmentation(MultiCropConfig(num_query=num_query, patch_size=patch, local_crops_number=0))
    boxes = augment.query_boxes(image)
    query_crops = augment.crop_queries(image, boxes)
    probs, layout = backbone.last_attention(views, query_crops[None] if num_query else None)
    P, R, grid = layout.num_prefix, layout.num_raw, size // patch

    def to_pixels(weights: torch.Tensor) -> torch.Tensor:  # [..., patches] -> [..., size, size]
        maps = weights.reshape(-1, 1, grid, grid)
        return F.interpolate(maps, size=(size, size), mode="nearest")[:, 0]

    os.makedirs(output_dir, exist_ok=True)
    cls_maps = to_pixels(probs[0, :, 0, P:R])
    tiles = [pixels] + [heat_overlay(pixels, m) for m in cls_maps]
    paths = [os.path.join(output_dir, "cls_attention.png")]
    save_image(make_grid(tiles, nrow=len(tiles), padding=2, pad_value=1.0), paths[0])
    if num_query:
        query_maps = to_pixels(probs[0, :, R:, P:R].mean(0))
        tiles = []
        for (top, left, h, w), heat in zip(boxes.tolist(), query_maps):
            box = torch.tensor([[left, top, left + w - 1, top + h - 1]])
            tiles.append(draw_bounding_boxes((pixels * 255).to(torch.uint8), box, colors="cyan", width=1).float() / 255)
            tiles.append(heat_overlay(pixels, heat))
        paths.append(os.path.join(output_dir, "query_attention.png"))
        save_image(make_grid(tiles, nrow=2, padding=2, pad_value=1.0), paths[1])
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth written by train.py")
    parser.add_argument("--image", help="an image file (default: a built-in shapes image)")
    parser.add_argument("--builtin_index", type=int, default=0, help="which built-in test image to show")
    parser.add_argument("--num_query", type=int, default=6, help="query crops to place on the image")
    parser.add_argument("--branch", choices=BRANCHES, default="teacher")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query-crop positions")
    parser.add_argument("--output_dir", default="pictures")
    args = parser.parse_args(argv)

    backbone, run = load_backbone(args.checkpoint, args.branch)
    if args.image:
        image = Image.open(args.image)
    else:
        pixels = SyntheticShapes(args.builtin_index + 1, run.global_size, "test", run.seed).generate(
            args.builtin_index
        )[0]
        image = v2.functional.to_pil_image(pixels)
    torch.manual_seed(args.seed)
    for path in attention_pictures(backbone, image, run.global_size, run.patch_size, args.num_query, args.output_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
