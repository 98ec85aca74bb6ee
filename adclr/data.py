"""Data: a built-in synthetic shapes dataset (no download), image folders, and labelled folders for evaluation.

The built-in set is generated deterministically from (seed, split, index): each image holds one
shape (disk, square, triangle, cross, ring or bar) of random size, position and rotation, in a grey
level contrasting with a textured grey background. The class is the shape and brightness carries no
information about it, so a representation must see form to classify it (k-NN); the per-pixel
mask (0 = background, c + 1 = shape c) makes a dense evaluation (segmentation mIoU) meaningful.

Evaluation reads two folder layouts: ``LabelledImages`` (an ImageFolder tree, for k-NN and the
linear probe) and ``SegmentationFolder`` (``images/`` and ``masks/`` pairs, for the segmentation
probe). ``write_shapes`` (or ``python -m adclr.data DIR``) writes the built-in shapes in both.
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from .cli import UserError, not_a_segmentation_split

SHAPES = ("disk", "square", "triangle", "cross", "ring", "bar")
SEGMENTATION_CLASSES = ("background", *SHAPES)  # mask value c is SEGMENTATION_CLASSES[c]
IGNORE_INDEX = 255  # mask value of pixels that no metric or loss counts (VOC / ADE convention)
MASK_MODES = ("L", "P", "I", "I;16")  # single-channel PNG modes whose pixel values are class indices
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
    """``length`` generated images of ``size`` px; items are ``(uint8 [3, size, size], label)``.

    With ``target="mask"`` items are ``(uint8 [3, size, size], int64 mask [size, size])`` (the
    segmentation view, classes ``SEGMENTATION_CLASSES``) and ``transform(image, mask)`` is joint.
    """

    num_classes = len(SHAPES)

    def __init__(
        self,
        length: int = 2400,
        size: int = 32,
        split: str = "train",
        seed: int = 0,
        transform=None,
        target: str = "label",
    ):
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"split must be one of {tuple(_SPLIT_OFFSET)}, got {split!r}")
        if target not in ("label", "mask"):
            raise ValueError(f"target must be 'label' or 'mask', got {target!r}")
        self.length, self.size, self.split, self.seed, self.transform = length, size, split, seed, transform
        self.target = target
        self.classes = list(SHAPES if target == "label" else SEGMENTATION_CLASSES)

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
        image, mask, label = self.generate(index)
        if self.target == "mask":
            return self.transform(image, mask) if self.transform else (image, mask)
        return (self.transform(image) if self.transform else image), label


class DataError(UserError):
    """A data folder that cannot be trained on: missing, not a folder, or without readable images."""


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


class LabelledImages(Dataset):
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

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_rgb(path)
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


class SegmentationFolder(Dataset):
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

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image_path, mask_path = self.samples[index]
        image = load_rgb(image_path)
        with Image.open(mask_path) as mask:
            mask = torch.from_numpy(np.asarray(mask, dtype=np.int64).copy())
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


def write_shapes(root: str, train_size: int = 1600, val_size: int = 600, size: int = 32, seed: int = 0) -> None:
    """Write the built-in shapes as evaluation folders (lossless PNG, so reading them back is exact).

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
        shapes = SyntheticShapes(length, size, split, seed)
        for index in range(length):
            image, mask, label = shapes.generate(index)
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
    parser = argparse.ArgumentParser(description="Write the built-in shapes as evaluation folders (see write_shapes).")
    parser.add_argument("output_dir", help="folder to write classification/ and segmentation/ into")
    parser.add_argument("--train_size", type=int, default=1600)
    parser.add_argument("--val_size", type=int, default=600)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_shapes(args.output_dir, args.train_size, args.val_size, args.size, args.seed)
    print(f"wrote {args.output_dir}/classification/{{train,val}} and {args.output_dir}/segmentation/{{train,val}}")


if __name__ == "__main__":
    main()
