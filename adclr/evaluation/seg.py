"""A linear segmentation probe on frozen patch features: the light-weight dense evaluation.

    python -m adclr.eval_seg --weights runs/adclr/checkpoint.pth --data_path /data/voc_seg
    torchrun --nproc_per_node 8 -m adclr.eval_seg --weights backbone.safetensors --data_path /data/ade20k

``--data_path`` holds ``train/`` and ``val/``, each with ``images/`` and ``masks/`` paired by file name
(masks are single-channel PNGs of class indices, 255 = ignore, as VOC and ADE20K ship them).

Protocol: each image is resized to ``--image_size`` squared (bicubic; a multiple of the patch size),
the frozen backbone's last-block patch tokens (after the final norm) go through one linear layer (a
1x1 convolution on the patch grid), the logits are upsampled bilinearly to the mask and trained with
cross-entropy (AdamW, cosine schedule, ``--epochs`` epochs) against the mask resized to the same
size (nearest). The backbone is frozen and the transform deterministic, so the train features are
extracted once and cached (float16, in CPU memory). On val the logits are upsampled to each mask's
own resolution; mIoU (the mean over classes present in the ground truth or the predictions) and
per-class IoU come from one confusion matrix accumulated over all val pixels. Writes
``eval_seg.json`` to ``--output_dir`` and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import colorsys
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.transforms import InterpolationMode, v2

from ..augment import IMAGENET_MEAN, IMAGENET_STD
from ..data import IGNORE_INDEX, SegmentationFolder
from ..distributed import DistInfo
from ..files import atomic_write
from . import commands
from .features import FrozenBackbone, autocast, extract_features, positive, progress, split_folders


class SegTransform:
    """Joint transform of ``(image, int mask [H, W])``: the image resized to ``size`` x ``size`` (bicubic)
    and normalised; the mask as uint8, resized to the same size (nearest) when ``resize_mask``, else kept
    at its own resolution (val: the metric is computed there)."""

    def __init__(self, size: int, resize_mask: bool):
        self.size, self.resize_mask = size, resize_mask
        self.image = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __call__(self, image, mask: torch.Tensor):
        if mask.min() < 0 or mask.max() > IGNORE_INDEX:
            raise ValueError(f"mask values must be class indices below {IGNORE_INDEX} or {IGNORE_INDEX} (ignore)")
        mask = mask.to(torch.uint8)
        if self.resize_mask:
            mask = v2.functional.resize(mask[None], [self.size, self.size], InterpolationMode.NEAREST_EXACT)[0]
        return self.image(image).as_subclass(torch.Tensor), mask


def seg_transform(size: int, resize_mask: bool = False) -> SegTransform:
    return SegTransform(size, resize_mask)


def confusion_matrix(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[num_classes, num_classes]`` pixel counts, rows = ground truth, columns = prediction; 255 ignored."""
    valid = target != IGNORE_INDEX
    pairs = target[valid].long() * num_classes + prediction[valid].long()
    return torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_from_confusion(confusion: torch.Tensor) -> dict:
    """mIoU (%) over the classes present in ground truth or prediction, per-class IoU (``None`` where a
    class is in neither), pixel accuracy (%) and the number of pixels scored."""
    if confusion.sum() == 0:
        raise ValueError("no val pixel carries a class (every mask pixel is 255, ignore): nothing to score")
    confusion = confusion.double().cpu()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    iou = torch.where(present, intersection / union.clamp_min(1), torch.nan)
    return {
        "miou": 100 * iou[present].mean().item(),
        "per_class_iou": [100 * v if present[c] else None for c, v in enumerate(iou.tolist())],
        "pixel_accuracy": 100 * (intersection.sum() / confusion.sum()).item(),
        "pixels": int(confusion.sum()),
    }


def _collate_masks(batch):
    images, masks = zip(*batch)
    return torch.stack(images), list(masks)


def _shard(dataset, dist_info: DistInfo, pad: bool):
    """This process's part of ``dataset``: padded to equal shards (training) or disjoint (scoring)."""
    if not dist_info.enabled:
        return dataset
    if pad:
        return Subset(dataset, list(DistributedSampler(dataset, dist_info.world_size, dist_info.rank, shuffle=False)))
    return Subset(dataset, range(dist_info.rank, len(dataset), dist_info.world_size))


def _logits(head: nn.Module, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, N, C]`` patch tokens -> ``[B, K, H/p, W/p]`` logits (the 1x1 convolution)."""
    return head(patches.float()).transpose(1, 2).unflatten(2, grid)


def seg_probe(*args, pictures: int = 0, **kwargs) -> dict:
    """Train the linear head on ``train_set`` and score it on ``val_set`` (arguments of ``train_seg_head``):
    ``iou_from_confusion``'s metrics plus ``num_classes``, and with ``pictures`` > 0 ``seg_pictures``' image
    of that many val items under ``"pictures"``."""
    head, num_classes, grid, backbone, val_set, options = train_seg_head(*args, **kwargs)
    results = score_seg_probe(backbone, head, val_set, num_classes, grid, **options)
    if pictures:
        results["pictures"] = seg_pictures(backbone, head, val_set, pictures, grid, options["device"])
    return results


def train_seg_head(
    backbone: FrozenBackbone,
    train_set,
    val_set,
    *,
    num_classes: int | None = None,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 16,
    extract_batch_size: int | None = None,
    device: torch.device,
    num_workers: int = 0,
    dist_info: DistInfo | None = None,
    seed: int = 0,
) -> dict:
    """Train the linear head on ``train_set``; returns ``(head, num_classes, grid, backbone, val_set, options)``,
    what ``score_seg_probe`` takes (``options``: its keyword arguments).

    The datasets yield ``SegTransform`` output: ``(image [3, S, S], uint8 mask)``, train masks resized
    to ``S x S``. ``num_classes`` defaults to the largest class index in the train masks + 1. Seeded
    (head initialisation and batch order use their own generators). Under torchrun each process caches
    its shard of the train features, the head trains with DDP and the confusion matrices are summed.
    Returns ``iou_from_confusion``'s metrics plus ``num_classes``.
    """
    positive("epochs", epochs)
    positive("batch_size", batch_size)
    dist_info = dist_info or DistInfo()
    image_size = train_set[0][0].shape[-1]
    if image_size % backbone.patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of the patch size {backbone.patch_size}")
    grid = (image_size // backbone.patch_size,) * 2

    def patch_features(images: torch.Tensor) -> torch.Tensor:
        return backbone(images).patches

    features, masks = extract_features(
        patch_features,
        _shard(train_set, dist_info, pad=True),
        batch_size=extract_batch_size or batch_size,
        device=device,
        num_workers=num_workers,
        dtype=torch.float16,
        desc="seg train features",
    )
    labels = masks[masks != IGNORE_INDEX]
    largest = torch.tensor(int(labels.max()) if labels.numel() else -1, device=device)
    if dist_info.enabled:
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    if largest < 0:
        raise ValueError("every train mask pixel is 255 (ignore): there is nothing to train on")
    if num_classes is None:
        num_classes = int(largest) + 1
    elif largest >= num_classes:
        raise ValueError(f"a train mask has class {int(largest)} but num_classes is {num_classes}")

    generator = torch.Generator().manual_seed(seed + dist_info.rank)
    head = nn.Linear(backbone.embed_dim, num_classes, device="meta").to_empty(device=device)  # no global RNG draw
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    trained = (
        DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None)
        if dist_info.enabled
        else head
    )
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(features) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch, eta_min=0)
    for _ in progress(range(epochs), "seg probe epochs", dist_info):
        for index in torch.randperm(len(features), generator=generator).split(batch_size):
            target = masks[index].to(device, non_blocking=True).long()
            logits = _logits(trained, features[index].to(device, non_blocking=True), grid)
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
            loss = loss / (target != IGNORE_INDEX).sum().clamp_min(1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()

    options = dict(device=device, num_workers=num_workers, dist_info=dist_info, batch_size=batch_size)
    return head, num_classes, grid, backbone, val_set, options


@torch.no_grad()
def score_seg_probe(
    backbone: FrozenBackbone,
    head: nn.Module,
    val_set,
    num_classes: int,
    grid: tuple[int, int],
    device: torch.device,
    num_workers: int = 0,
    dist_info: DistInfo | None = None,
    batch_size: int = 16,
) -> dict:
    """mIoU of ``head`` on ``val_set``: logits upsampled (bilinear) to each mask's own size."""
    dist_info = dist_info or DistInfo()
    loader = DataLoader(
        _shard(val_set, dist_info, pad=False),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=_collate_masks,
        generator=torch.Generator().manual_seed(0),  # leaves the caller's random stream alone
    )
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    largest = torch.tensor(-1, device=device)  # largest class index seen in val masks
    for images, masks in progress(loader, "seg val", dist_info):
        with autocast(device):
            patches = backbone(images.to(device, non_blocking=True)).patches
        logits = _logits(head, patches, grid)
        for logit, mask in zip(logits, masks):
            mask = mask.to(device)
            labels = mask[mask != IGNORE_INDEX]
            if labels.numel():
                largest = torch.maximum(largest, labels.max().long())
            if largest >= num_classes:
                continue
            size = mask.shape[-2:]
            prediction = F.interpolate(logit[None], size=size, mode="bilinear", align_corners=False).argmax(1)[0]
            confusion += confusion_matrix(prediction, mask, num_classes)
    if dist_info.enabled:  # reduce before refusing, so that no process waits for one that stopped
        dist.all_reduce(confusion)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    if largest >= num_classes:
        raise ValueError(
            f"a val mask has class {int(largest)} but the probe has {num_classes} classes (0-{num_classes - 1}, "
            "from the train masks); give --num_classes"
        )
    return {**iou_from_confusion(confusion), "num_classes": num_classes}


@torch.no_grad()
def seg_pictures(
    backbone: FrozenBackbone, head: nn.Module, val_set, count: int, grid: tuple[int, int], device
) -> Image:
    """One row per val item (the first ``count``): the image, its true mask and the probe's predicted mask,
    side by side, each class in its own colour (ignored pixels grey), enlarged to be read at a glance."""
    rows = []
    for index in range(min(count, len(val_set))):
        image, mask = val_set[index]
        with autocast(device):
            patches = backbone(image[None].to(device)).patches
        logits = F.interpolate(_logits(head, patches, grid), size=mask.shape[-2:], mode="bilinear", align_corners=False)
        predicted = logits.argmax(1)[0].cpu()
        pixels = image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
        pixels = v2.functional.resize(pixels.clamp(0, 1), list(mask.shape[-2:]), antialias=True)
        palette = _palette(head.out_features)
        rows.append(torch.cat([pixels, palette[mask.long()].permute(2, 0, 1), palette[predicted].permute(2, 0, 1)], 2))
    width = max(row.shape[-1] for row in rows)
    grid_image = torch.cat([F.pad(row, (0, width - row.shape[-1])) for row in rows], 1)
    scale = max(1, 256 // grid_image.shape[-1] * 2)
    picture = v2.functional.to_pil_image(grid_image)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def _palette(num_classes: int) -> torch.Tensor:
    """``[256, 3]`` colours: class 0 black, the others evenly spaced hues, every other index (ignore) grey."""
    colours = torch.full((256, 3), 0.5)
    colours[0] = 0
    for c in range(1, num_classes):
        colours[c] = torch.tensor(colorsys.hsv_to_rgb((c - 1) / max(num_classes - 1, 1), 0.85, 1.0))
    return colours


def get_args_parser() -> argparse.ArgumentParser:
    parser = commands.command_parser("adclr.eval_seg", __doc__, image_size=448, batch_size=16)
    parser.add_argument("--num_classes", type=int, help="classes (default: the largest train mask index + 1)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine to 0)")
    parser.add_argument(
        "--pictures",
        type=int,
        default=0,
        help="also write seg_pictures.png: image, true and predicted mask of N val images",
    )
    return parser


def run(args: argparse.Namespace) -> dict | None:
    """The command's work; returns the results on the main process (``None`` on the others)."""
    commands.check_sizes(args)
    if args.num_classes is not None:
        positive("num_classes", args.num_classes)
    train_dir, val_dir = split_folders(args.data_path)
    train_set = SegmentationFolder(train_dir, seg_transform(args.image_size, resize_mask=True))
    val_set = SegmentationFolder(val_dir, seg_transform(args.image_size))
    positive("pictures", args.pictures, minimum=0)
    backbone, where, dist_info = commands.to_device(commands.load_backbone(args), args)
    results = seg_probe(
        backbone,
        train_set,
        val_set,
        num_classes=args.num_classes,
        epochs=args.epochs,
        lr=args.lr,
        **where,
        seed=args.seed,
        pictures=args.pictures,
    )
    pictures = results.pop("pictures", None)
    if not dist_info.is_main:
        return None
    if pictures is not None:
        os.makedirs(args.output_dir, exist_ok=True)
        with atomic_write(os.path.join(args.output_dir, "seg_pictures.png"), "wb") as f:
            pictures.save(f, format="PNG")
    report = {
        **commands.report_header(args, "linear segmentation probe on frozen patch tokens"),
        "epochs": args.epochs,
        "lr": args.lr,
        "num_train": len(train_set),
        "num_val": len(val_set),
        **results,
    }
    summary = (
        f"linear segmentation probe on {len(val_set)} val images ({results['num_classes']} classes): "
        f"mIoU {results['miou']:.2f}, pixel accuracy {results['pixel_accuracy']:.2f}"
    )
    return commands.publish(args, "eval_seg.json", report, summary)


def main(argv=None) -> None:
    """``python -m adclr.eval_seg`` with ``argv`` (default: the command line)."""
    commands.run_command(get_args_parser(), argv, run)
