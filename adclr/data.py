"""Data: a built-in synthetic shapes dataset (no download) and image folders (ImageFolder tree or flat).

The built-in set is generated deterministically from (seed, split, index): each image holds one
shape (disk, square, triangle, cross, ring or bar) of random size, position and rotation, in a grey
level contrasting with a textured grey background. The class is the shape and brightness carries no
information about it, so a representation must see form to classify it (k-NN); the per-pixel
mask (0 = background, c + 1 = shape c) makes a dense evaluation (segmentation mIoU) meaningful.
"""

from __future__ import annotations

import os
import warnings

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, find_classes, make_dataset

from .cli import UserError

SHAPES = ("disk", "square", "triangle", "cross", "ring", "bar")
_SPLIT_OFFSET = {"train": 0, "test": 1_000_003}


def _shape_mask(
    kind: int, ys: torch.Tensor, xs: torch.Tensor, cy: float, cx: float, r: float, angle: float
) -> torch.Tensor:
    """Boolean mask of shape ``kind`` centred at (cy, cx) with radius ``r``, rotated by ``angle``."""
    dy, dx = ys - cy, xs - cx
    cos, sin = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    if kind == 0:
        return u**2 + v**2 <= r**2
    if kind == 1:
        return (u.abs() <= r * 0.85) & (v.abs() <= r * 0.85)
    if kind == 2:
        return (v <= r * 0.6) & (v >= 1.7 * u.abs() - r)
    if kind == 3:
        return ((u.abs() <= r * 0.3) & (v.abs() <= r)) | ((v.abs() <= r * 0.3) & (u.abs() <= r))
    if kind == 4:
        d2 = u**2 + v**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    return (u.abs() <= r) & (v.abs() <= r * 0.35)


class SyntheticShapes(Dataset):
    """``length`` generated images of ``size`` px; items are ``(uint8 [3, size, size], label)``."""

    num_classes = len(SHAPES)

    def __init__(self, length: int = 2400, size: int = 32, split: str = "train", seed: int = 0, transform=None):
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"split must be one of {tuple(_SPLIT_OFFSET)}, got {split!r}")
        self.length, self.size, self.split, self.seed, self.transform = length, size, split, seed, transform

    def __len__(self) -> int:
        return self.length

    def generate(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(image uint8 [3, S, S], mask int64 [S, S], label)`` for ``index``; the same every call."""
        g = torch.Generator().manual_seed(self.seed * 7_919 + _SPLIT_OFFSET[self.split] + index)
        rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
        S = self.size
        label = index % len(SHAPES)
        # Supersample 2x and average for smooth edges.
        coords = (torch.arange(2 * S, dtype=torch.float32) + 0.5) / 2
        ys, xs = coords[:, None].expand(2 * S, 2 * S), coords[None, :].expand(2 * S, 2 * S)
        r = S * (0.2 + 0.15 * rand(1).item())
        cy, cx = (r + (S - 2 * r) * rand(2)).tolist()
        inside = _shape_mask(label, ys, xs, cy, cx, r, float(rand(1)) * 6.2832).float()

        # Grey levels with a faint tint: images differ in brightness and contrast, which the colour
        # jitter randomises, not in hue, which it barely moves; views of one image must then be
        # matched through the shape rather than through a colour shortcut.
        level, contrast = rand(2).tolist()
        background = level + 0.15 * rand(1, 2 * S, 2 * S) + 0.05 * rand(3, 1, 1)
        stripes = torch.sin(xs * (0.3 + rand(1)) + ys * rand(1) * 0.5) * 0.1 * rand(1)
        foreground = (level + (0.35 + 0.4 * contrast) * (1 if level < 0.5 else -1)) + 0.05 * rand(3, 1, 1)
        image = inside * foreground + (1 - inside) * (background + stripes)
        image = torch.nn.functional.avg_pool2d(image[None], 2)[0].clamp(0, 1)
        coverage = torch.nn.functional.avg_pool2d(inside[None, None], 2)[0, 0]
        mask = torch.where(coverage >= 0.5, label + 1, 0)
        return (image * 255).round().to(torch.uint8), mask, label

    def __getitem__(self, index: int):
        image, _, label = self.generate(index)
        return (self.transform(image) if self.transform else image), label


class DataError(UserError):
    """A data folder that cannot be trained on: missing, not a folder, or without readable images."""


class ImageFiles(Dataset):
    """Images under ``root``: an ImageFolder tree (labels from folder names) or a flat folder (label -1).

    A folder of at most ``check_limit`` image files has each file's header read here (PIL identifies the
    format without decoding pixels: about 0.2 ms a file), and files that are not images are left out
    with one warning, so that ``len`` counts images where it matters: whether a small folder holds one
    batch. Larger folders are not read at start-up. There, and for a file whose header is fine but whose
    pixels are not, an unreadable file is skipped with a warning when it comes up (the next readable one
    is returned instead), so a corrupt image never stops a run.
    """

    def __init__(self, root: str, transform=None, check_limit: int = 10_000):
        if not os.path.exists(root):
            raise DataError(f"data_path {root} does not exist")
        if not os.path.isdir(root):
            raise DataError(f"data_path {root} is a file; it must be a folder of images or an ImageFolder tree")
        subdirs = [d for d in os.scandir(root) if d.is_dir()]
        if subdirs:
            self.classes, class_to_idx = find_classes(root)
            self.samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        else:
            self.classes = []
            names = sorted(f for f in os.listdir(root) if f.lower().endswith(IMG_EXTENSIONS))
            self.samples = [(os.path.join(root, f), -1) for f in names]
        if not self.samples:
            raise DataError(f"data_path {root} holds no images (files ending in {', '.join(IMG_EXTENSIONS)})")
        if len(self.samples) <= check_limit:
            self.samples = self._readable(self.samples, root)
        self.transform = transform

    @staticmethod
    def _readable(samples: list[tuple[str, int]], root: str) -> list[tuple[str, int]]:
        """The samples whose file PIL recognises as an image (from its header; pixels are not decoded)."""
        readable, broken = [], []
        for path, label in samples:
            try:
                with Image.open(path):
                    readable.append((path, label))
            except (OSError, SyntaxError, ValueError) as error:  # what PIL raises for a bad file
                broken.append(f"{os.path.relpath(path, root)} ({error})")
        if not readable:
            raise DataError(f"data_path {root}: none of its {len(samples)} image files can be read, e.g. {broken[0]}")
        if broken:
            shown = "; ".join(broken[:3]) + ("; ..." if len(broken) > 3 else "")
            warnings.warn(
                f"leaving out {len(broken)} of {len(samples)} files that are not images: {shown}", stacklevel=3
            )
        return readable

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = default_loader(path)
            except Exception as error:  # noqa: BLE001 - any decoding failure means "skip this file"
                warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=2)
                continue
            return (self.transform(image) if self.transform else image), label
        raise RuntimeError(f"no readable image among the {len(self.samples)} files")


def collate_multicrop(batch):
    """Batch ``(augmentation dict, label)`` pairs: crops -> list of ``[B, 3, s, s]``; queries ``[B, Q, 3, p, p]``."""
    views, labels = zip(*batch)
    crops = [torch.stack(c) for c in zip(*(v["crops"] for v in views))]
    query_crops = torch.stack([v["query_crops"] for v in views])
    return crops, query_crops, torch.tensor(labels)
