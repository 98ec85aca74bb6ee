"""Helpers of the evaluation tests: tiny backbones on disk and small labelled folders."""

import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from adclr.export import METADATA_KEY
from adclr.model import build_vit, timm_create_kwargs

PATCH, SIZE = 8, 32  # vit_pico on 32 px images: a 4 x 4 patch grid


def random_vit(seed: int = 0):
    torch.manual_seed(seed)
    return build_vit("vit_pico", PATCH, SIZE, attn_backend="sdpa").eval()


def write_export(model, path) -> str:
    """``model`` saved as ``adclr.export`` saves a backbone (a timm-loadable safetensors file)."""
    tensors = {name: t.contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(timm_create_kwargs("vit_pico", PATCH, SIZE))})
    return str(path)


def save_png(array: np.ndarray, path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])


def write_colour_classes(root, per_class: int, seed: int, size: int = SIZE, classes=("blue", "green", "red")) -> None:
    """An ImageFolder tree whose class is the image's dominant colour (plus noise): features carry the label."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        for i in range(per_class):
            noise = rng.integers(-40, 40, (size, size, 3))
            pixels = np.clip(COLOURS[label % len(COLOURS)] + noise, 0, 255).astype(np.uint8)
            save_png(pixels, os.path.join(root, name, f"{i:03d}.png"))


def write_colour_segmentation(root, count: int, seed: int, size: int = SIZE) -> None:
    """images/ + masks/ pairs: a grey noisy background (class 0) with a red (1) and a blue (2) rectangle.

    Rectangles cover whole 8-px patches or more, so patch features carry the class; some pixels of
    each mask are 255 (ignore)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(90, 160, (size, size, 3))
        mask = np.zeros((size, size), np.uint8)
        for label, colour in ((1, (220, 30, 30)), (2, (30, 30, 220))):
            h, w = rng.integers(8, 17, 2)
            top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            pixels[top : top + h, left : left + w] = colour
            mask[top : top + h, left : left + w] = label
        mask[0, :4] = 255
        save_png(pixels.astype(np.uint8), os.path.join(root, "images", f"{i:03d}.png"))
        save_png(mask, os.path.join(root, "masks", f"{i:03d}.png"))
