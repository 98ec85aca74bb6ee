"""Data: built-in synthetic scenes (no download), image folders, and labelled folders for evaluation.

The built-in set (``SyntheticScenes``) is generated deterministically from (seed, split, index): each
scene holds several objects of six shapes (disk, square, triangle, cross, ring, bar) on a textured
background, each with its own size, rotation, texture and contrast. A scene's label is the shape of
its largest object (for k-NN) and its per-pixel mask (0 = background, c + 1 = shape c) makes a dense
evaluation (segmentation mIoU) meaningful: since colour and texture carry no class, a patch's class
is read from the form of the object it lies in, which a representation must learn.

Evaluation reads two folder layouts: ``LabelledImages`` (an ImageFolder tree, for k-NN and the
linear probe) and ``SegmentationFolder`` (``images/`` and ``masks/`` pairs, for the segmentation
probe). ``write_scenes`` (or ``python -m adclr.data DIR``) writes the built-in scenes in both.
"""

from __future__ import annotations

import argparse
import functools
import os
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from .cli import not_a_segmentation_split
from .errors import DataError

SHAPES = ("disk", "square", "triangle", "cross", "ring", "bar")
SEGMENTATION_CLASSES = ("background", *SHAPES)  # mask value c is SEGMENTATION_CLASSES[c]
IGNORE_INDEX = 255  # mask value of pixels that no metric or loss counts (VOC / ADE convention)
MASK_MODES = ("L", "P", "I", "I;16")  # single-channel PNG modes whose pixel values are class indices
_SPLIT_OFFSET = {"train": 0, "holdout": 500_001, "test": 1_000_003}


class SyntheticScenes(Dataset):
    """``length`` generated scenes of ``size`` px; items are ``(uint8 [3, size, size], label)``.

    Each scene holds two or three objects (``SHAPES``) on a textured background: a large main object,
    whose shape is the image's label (``index % 6``: classes are balanced), and one or two smaller
    ones of any shape, drawn first so the main object may cover them. Every object gets its own size,
    rotation, fill texture (flat, stripes, checks or speckle, at a random scale and angle), colour and
    contrast (brighter or darker than the background), so no pixel statistic gives a class away: only
    form does. At the default 48 px with 8 px patches the grid is 6 x 6 and the median object covers
    more than 2 x 2 patches.

    With ``target="mask"`` items are ``(uint8 [3, size, size], int64 mask [size, size])``: per pixel the
    class of an object that owns at least half of it (``SEGMENTATION_CLASSES``: 0 = background,
    c + 1 = shape c), and ``transform(image, mask)`` is joint. ``split`` is ``train``, ``holdout`` (more
    train-distribution scenes, never trained on: for choosing settings) or ``test`` (the val split).
    Scenes are generated from ``(seed, split, index)``, the same on every call (a few milliseconds each,
    then cached).
    """

    num_classes = len(SHAPES)

    def __init__(
        self,
        length: int = 1600,
        size: int = 48,
        split: str = "train",
        seed: int = 0,
        transform=None,
        target: str = "label",
    ):
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"split must be one of {tuple(_SPLIT_OFFSET)}, got {split!r}")
        if target not in ("label", "mask"):
            raise ValueError(f"target must be 'label' or 'mask', got {target!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise ValueError(f"size must be an integer >= 8 (pixels), got {size!r}")
        self.length, self.size, self.split, self.seed, self.transform = length, size, split, seed, transform
        self.target = target
        self.classes = list(SHAPES if target == "label" else SEGMENTATION_CLASSES)

    def __len__(self) -> int:
        return self.length

    def generate(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(image uint8 [3, S, S], mask int64 [S, S], label)`` for ``index``; the same every call."""
        if not 0 <= index < self.length:
            raise IndexError(f"scene index {index} out of range for {self.length} scenes")
        image, mask, label = _scene(self.seed, self.split, self.size, index)
        return image.clone(), mask.long(), label

    def precompute(self) -> SyntheticScenes:
        """Generate every scene now (into a cache shared by every ``SyntheticScenes`` of this process and the
        data-loader workers it forks later), so that training never waits on generation."""
        for index in range(self.length):
            _scene(self.seed, self.split, self.size, index)
        return self

    def __getitem__(self, index: int):
        image, mask, label = self.generate(index)
        if self.target == "mask":
            return self.transform(image, mask) if self.transform else (image, mask)
        return (self.transform(image) if self.transform else image), label


@functools.lru_cache(maxsize=16_384)  # ~150 MB at 48 px: a default run's train, evaluation and probe scenes
def _scene(seed: int, split: str, S: int, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Scene ``index`` of ``SyntheticScenes(seed=seed, split=split, size=S)``: uint8 image and mask, label."""
    rng = np.random.default_rng([seed, _SPLIT_OFFSET[split] + index])
    label = index % len(SHAPES)
    # Supersampled 2x, then averaged: smooth edges, and a coverage fraction for the mask.
    coords = (np.arange(2 * S, dtype=np.float32) + 0.5) / 2
    ys, xs = coords[:, None], coords[None, :]

    # Grey levels in a narrow band, objects brighter or darker at random: brightness tells neither the image
    # (it would be an easy cue for telling scenes apart, which the colour jitter only partly hides) nor the class.
    level = 0.4 + 0.2 * rng.random()
    image = level + _texture(ys, xs, S, rng, amplitude=0.08) + 0.04 * (rng.random((3, 1, 1)) - 0.5)
    owner = np.zeros((2 * S, 2 * S), dtype=np.int64)  # class + 1 of the topmost object per subpixel
    others = int(rng.integers(1, 3))
    for k in range(others + 1):
        main = k == others  # drawn last: the label's object is never covered
        kind = label if main else int(rng.integers(len(SHAPES)))
        r = S * ((0.3 + 0.1 * rng.random()) if main else (0.18 + 0.08 * rng.random()))
        cy, cx = r * 0.6 + (S - 1.2 * r) * rng.random(2)  # mostly inside the image
        inside = _shape_mask(kind, ys, xs, cy, cx, r, rng.random() * 2 * np.pi)
        sign = 1 if rng.random() < 0.5 else -1
        fill = level + sign * (0.3 + 0.2 * rng.random()) + _texture(ys, xs, S, rng, amplitude=0.08)
        fill = fill + 0.06 * (rng.random((3, 1, 1)) - 0.5)
        image = np.where(inside, fill, image)
        owner = np.where(inside, kind + 1, owner)
    image = image.reshape(3, S, 2, S, 2).mean(axis=(2, 4)).clip(0, 1)
    # A pixel's class is the object owning at least 2 of its 4 subpixels (else background).
    blocks = owner.reshape(S, 2, S, 2).transpose(0, 2, 1, 3).reshape(S, S, 4)
    mask = np.zeros((S, S), dtype=np.int64)
    for c in np.unique(owner[owner > 0]):
        mask[(blocks == c).sum(-1) >= 2] = c
    image = torch.from_numpy((image * 255).round().astype(np.uint8))
    return image, torch.from_numpy(mask.astype(np.uint8)), label


def _shape_mask(kind: int, ys: np.ndarray, xs: np.ndarray, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    """Boolean mask of shape ``kind`` (``SHAPES``) centred at (cy, cx) with radius ``r``, rotated by ``angle``."""
    dy, dx = ys - cy, xs - cx
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    if kind == 0:
        return u**2 + v**2 <= r**2
    if kind == 1:
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if kind == 2:
        return (v <= r * 0.6) & (v >= 1.7 * np.abs(u) - r)
    if kind == 3:
        return ((np.abs(u) <= r * 0.3) & (np.abs(v) <= r)) | ((np.abs(v) <= r * 0.3) & (np.abs(u) <= r))
    if kind == 4:
        d2 = u**2 + v**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    return (np.abs(u) <= r) & (np.abs(v) <= r * 0.35)


def _texture(ys: np.ndarray, xs: np.ndarray, size: int, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A random zero-mean texture ``[1, H, W]``: flat, stripes, checks or speckle, at a random scale and angle."""
    kind = int(rng.integers(4))
    angle, period = rng.random() * np.pi, size * (0.08 + 0.12 * rng.random())
    strength = amplitude * (0.5 + rng.random())
    cos, sin = np.cos(angle) * 2 * np.pi / period, np.sin(angle) * 2 * np.pi / period
    u, v = cos * xs + sin * ys, cos * ys - sin * xs
    if kind == 0:
        pattern = np.zeros((ys.shape[0], xs.shape[1]), dtype=np.float32)
    elif kind == 1:
        pattern = np.sin(u)
    elif kind == 2:
        pattern = np.sign(np.sin(u) * np.sin(v))
    else:
        pattern = 2 * rng.random((ys.shape[0], xs.shape[1]), dtype=np.float32) - 1
    return (strength * pattern)[None]


class UniqueFiles:
    """Image files under folders of one tree, each real folder visited once and each real file listed once.

    Symbolic links are followed (datasets are often assembled from links), but a link back to a folder
    already visited (a loop, which ``os.walk`` would follow until paths grow too long) or a second link
    to a folder or file already seen is passed over: every image counts once. ``root`` counts as
    visited. Paths come in sorted order, as torchvision's ``make_dataset`` lists them.
    """

    def __init__(self, root: str):
        self.folders = {_identity(root)}
        self.files: set[tuple[int, int]] = set()

    def images(self, folder: str, extensions: tuple[str, ...] = IMG_EXTENSIONS) -> list[str]:
        """The image files under ``folder`` (recursively) not listed before; none if ``folder`` was visited."""
        found = []
        for current, dirs, files in os.walk(folder, followlinks=True):
            identity = _identity(current)
            if identity in self.folders:
                dirs[:] = []
                continue
            self.folders.add(identity)
            dirs.sort()
            for name in sorted(files):
                if not name.lower().endswith(extensions):
                    continue
                path = os.path.join(current, name)
                try:
                    identity = _identity(path)
                except OSError:  # a dangling link
                    continue
                if identity not in self.files:
                    self.files.add(identity)
                    found.append((current, name, path))
        return [path for *_, path in sorted(found)]


def class_folders(root: str) -> list[str]:
    """The sub-folders of ``root``, sorted, less links to ``root`` itself or to a folder above it (they hold
    no class of their own: a flat folder with a link to its parent stays a flat folder)."""
    real_root = os.path.realpath(root)
    return sorted(
        entry.name
        for entry in os.scandir(root)
        if entry.is_dir() and not (real_root + os.sep).startswith(os.path.realpath(entry.path).rstrip(os.sep) + os.sep)
    )


def _identity(path: str) -> tuple[int, int]:
    """(device, inode) of what ``path`` points to: the same for every link to it."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


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
        self.classes = class_folders(root)
        if self.classes:
            walk = UniqueFiles(root)  # a link loop or a linked copy counts each image once
            self.samples = [(p, i) for i, c in enumerate(self.classes) for p in walk.images(os.path.join(root, c))]
        else:
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
                image = load_rgb(path)
            except Exception as error:  # noqa: BLE001 - any decoding failure means "skip this file"
                warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=2)
                continue
            return (self.transform(image) if self.transform else image), label
        raise RuntimeError(f"no readable image among the {len(self.samples)} files")


def load_rgb(path: str) -> Image.Image:
    """The image at ``path`` as 8-bit RGB. 16-bit greyscale (PIL modes ``I;16*`` and ``I``, as 16-bit PNGs
    open) is scaled to 8 bits: PIL's own ``convert("RGB")`` clips every value above 255, so such an
    image would load almost all white."""
    with Image.open(path) as image:
        if image.mode.startswith("I;16") or image.mode == "I":
            pixels = np.asarray(image).astype(np.float64) / 257  # 65535 -> 255
            return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L").convert("RGB")
        return image.convert("RGB")


def _require_folder(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a folder; expected {what}")


class _ImageSamples(Dataset):
    """Items from ``samples``, a list of ``(image path, target)``: the RGB image and ``load_target(target)``,
    combined by ``item``."""

    samples: list[tuple[str, Any]]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        return self.item(load_rgb(path), self.load_target(target))

    def load_target(self, target):
        return target


class LabelledImages(_ImageSamples):
    """An ImageFolder tree ``root/<class>/<image>``; items are ``(PIL RGB image, class index)``.

    Classes are the sub-folder names in sorted order (torchvision's ``find_classes``). Unlike
    ``ImageFiles`` no file is skipped: an evaluation must score every image it counts.
    """

    def __init__(self, root: str, transform=None):
        _require_folder(root, "an ImageFolder tree (one sub-folder of images per class)")
        try:
            self.classes, class_to_idx = find_classes(root)
        except FileNotFoundError as error:  # torchvision's words for "no class folder"
            raise ValueError(f"{root!r}: {error}") from None
        not_a_segmentation_split(root, self.classes, "the folder")
        walk = UniqueFiles(root)  # a link loop or a linked copy counts each image once
        per_class = {c: walk.images(os.path.join(root, c)) for c in self.classes}
        empty = [c for c, paths in per_class.items() if not paths]
        if empty:
            raise ValueError(
                f"{root!r}: Found no valid file for the classes {', '.join(empty)}. "
                f"Supported extensions are: {', '.join(IMG_EXTENSIONS)}"
            )
        self.samples = [(path, class_to_idx[c]) for c, paths in per_class.items() for path in paths]
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def item(self, image: Image.Image, label: int):
        return (self.transform(image) if self.transform else image), label


def check_same_classes(train_classes, val_classes) -> None:
    """Refuse a train/val pair whose class lists differ (labels would silently mean different things)."""
    if list(train_classes) != list(val_classes):
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise ValueError(
            "train and val must have the same classes; "
            f"only in train: {only_train[:5] or 'none'}, only in val: {only_val[:5] or 'none'}"
        )


class SegmentationFolder(_ImageSamples):
    """Image/mask pairs ``root/images/<name>.<ext>`` and ``root/masks/<name>.png`` (VOC / ADE style).

    A mask is a single-channel PNG (grey or palette) of the image's size whose pixel values are class
    indices, ``IGNORE_INDEX`` (255) for pixels that do not count. Items are ``(PIL RGB image, int64
    mask [H, W])``, or ``transform(image, mask)``. Pairing and sizes are checked up front (from the
    file headers), so a bad folder is refused before any work starts.
    """

    def __init__(self, root: str, transform=None):
        _require_folder(root, "a folder with images/ and masks/")
        image_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "masks")
        _require_folder(image_dir, "the images of a segmentation folder")
        _require_folder(mask_dir, "the PNG masks of a segmentation folder (one per image, same name)")
        images = _files_by_stem(image_dir, IMG_EXTENSIONS)
        masks = _files_by_stem(mask_dir, (".png",))
        if not images:
            raise ValueError(f"no images with extensions {IMG_EXTENSIONS} found in {image_dir!r}")
        unmatched_images, unmatched_masks = sorted(images.keys() - masks.keys()), sorted(masks.keys() - images.keys())
        if unmatched_images or unmatched_masks:
            raise ValueError(
                f"images and masks in {root!r} must pair by file name; "
                f"images without a mask: {unmatched_images[:5] or 'none'}, "
                f"masks without an image: {unmatched_masks[:5] or 'none'}"
            )
        self.samples = [(images[stem], masks[stem]) for stem in sorted(images)]
        for image_path, mask_path in self.samples:
            with Image.open(image_path) as image, Image.open(mask_path) as mask:
                if mask.mode not in MASK_MODES:
                    raise ValueError(
                        f"mask {mask_path!r} has mode {mask.mode}; a mask must be a single-channel PNG "
                        f"({', '.join(MASK_MODES)}) of class indices"
                    )
                if mask.size != image.size:
                    raise ValueError(
                        f"mask {mask_path!r} is {mask.size[0]}x{mask.size[1]} but its image is "
                        f"{image.size[0]}x{image.size[1]}; a mask must have its image's size"
                    )
        self.transform = transform

    def load_target(self, mask_path: str) -> torch.Tensor:
        with Image.open(mask_path) as mask:
            return torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())

    def item(self, image: Image.Image, mask: torch.Tensor):
        return self.transform(image, mask) if self.transform else (image, mask)


def _files_by_stem(folder: str, extensions: tuple[str, ...]) -> dict[str, str]:
    files: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in extensions:
            continue
        if stem in files:
            raise ValueError(f"{folder!r} holds two files named {stem!r} ({os.path.basename(files[stem])}, {name})")
        files[stem] = os.path.join(folder, name)
    return files


def write_scenes(root: str, train_size: int = 1600, val_size: int = 600, size: int = 48, seed: int = 0) -> None:
    """Write the built-in scenes as evaluation folders (lossless PNG, so reading them back is exact).

    ``root/classification/{train,val}/<c>_<shape>/<index>.png``: ImageFolder trees (the ``<c>_``
    prefix keeps ``SHAPES``' label order); ``root/segmentation/{train,val}/{images,masks}/<index>.png``:
    image/mask pairs with ``SEGMENTATION_CLASSES`` indices. ``val`` is the built-in ``test`` split.
    """
    for folder, split, length in (("train", "train", train_size), ("val", "test", val_size)):
        classification = os.path.join(root, "classification", folder)
        segmentation = os.path.join(root, "segmentation", folder)
        for i, shape in enumerate(SHAPES):
            os.makedirs(os.path.join(classification, f"{i}_{shape}"), exist_ok=True)
        for sub in ("images", "masks"):
            os.makedirs(os.path.join(segmentation, sub), exist_ok=True)
        scenes = SyntheticScenes(length, size, split, seed)
        for index in range(length):
            image, mask, label = scenes.generate(index)
            picture = Image.fromarray(image.permute(1, 2, 0).numpy())
            name = f"{index:05d}.png"
            picture.save(os.path.join(classification, f"{label}_{SHAPES[label]}", name))
            picture.save(os.path.join(segmentation, "images", name))
            Image.fromarray(mask.numpy().astype(np.uint8)).save(os.path.join(segmentation, "masks", name))


def collate_multicrop(batch):
    """Batch ``(augmentation dict, label)`` pairs: crops -> list of ``[B, 3, s, s]``; queries ``[B, Q, 3, p, p]``."""
    views, labels = zip(*batch)
    crops = [torch.stack(c) for c in zip(*(v["crops"] for v in views))]
    query_crops = torch.stack([v["query_crops"] for v in views])
    return crops, query_crops, torch.tensor(labels)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the built-in scenes as evaluation folders (see write_scenes).")
    parser.add_argument("output_dir", help="folder to write classification/ and segmentation/ into")
    parser.add_argument("--train_size", type=int, default=1600)
    parser.add_argument("--val_size", type=int, default=600)
    parser.add_argument("--size", type=int, default=48, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_scenes(args.output_dir, args.train_size, args.val_size, args.size, args.seed)
    print(f"wrote {args.output_dir}/classification/{{train,val}} and {args.output_dir}/segmentation/{{train,val}}")


if __name__ == "__main__":
    main()
