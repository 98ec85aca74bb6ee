"""DINO's linear probe: a linear classifier trained on the frozen backbone's features of an ImageFolder pair.

    python -m adclr.eval_linear --weights runs/adclr/checkpoint.pth --data_path /data/imagenet
    torchrun --nproc_per_node 8 -m adclr.eval_linear --weights backbone.safetensors --data_path /data/imagenet

Protocol (Caron et al. 2021, ``eval_linear.py``): the input of the linear layer is the CLS token of
the last ``--n_last_blocks`` blocks, concatenated, plus with ``--avgpool_patchtokens`` the average of
the last block's patch tokens, all after the final norm. DINO's choices are the defaults: 4 blocks
and no pooling for ViT-S and smaller, 1 block with pooling for ViT-B and wider (embedding >= 768).
The layer (weights N(0, 0.01), no BatchNorm) trains with SGD, momentum 0.9, no weight decay, learning
rate ``--lr`` x total batch / 256 on a per-epoch cosine to 0, for ``--epochs`` (100) epochs on random
resized crops with horizontal flips; val images are resized to 256 and centre-cropped to 224
(``--image_size`` scales both). Reports top-1 / top-5 on val after the last epoch and the best epoch
(what DINO prints). ``linear_checkpoint.pth`` in ``--output_dir`` makes a restart resume; the results
go to ``eval_linear.json`` with a one-line summary.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.transforms import v2

from ..augment import IMAGENET_MEAN, IMAGENET_STD
from ..checkpoint import save_atomic
from ..cli import parse_bool
from ..distributed import DistInfo
from ..runtime import seed_everything
from . import commands
from .features import BackboneFeatures, FrozenBackbone, autocast, eval_transform, labelled_splits, positive, progress


class LinearClassifier(nn.Module):
    """DINO's probe: one linear layer, weights N(0, 0.01), bias 0."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def default_probe_features(backbone: FrozenBackbone) -> tuple[int, bool]:
    """DINO's ``(n_last_blocks, avgpool_patchtokens)``: (4, False) for ViT-S and smaller, (1, True) from ViT-B."""
    if backbone.embed_dim >= 768:
        return 1, True
    return min(4, backbone.depth), False


def probe_input(features: BackboneFeatures, avgpool: bool) -> torch.Tensor:
    """The linear layer's input: the last blocks' CLS tokens, then (optionally) the mean patch token."""
    parts = [features.cls_blocks.flatten(1)]
    if avgpool:
        parts.append(features.patches.mean(1))
    return torch.cat(parts, dim=1).float()


def train_transform(image_size: int) -> v2.Compose:
    """DINO's probe augmentation: random resized crop (scale 0.08-1) and horizontal flip."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


@torch.no_grad()
def validate(
    backbone: FrozenBackbone,
    classifier: nn.Module,
    val_set,
    *,
    n_last_blocks: int,
    avgpool: bool,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    dist_info: DistInfo | None = None,
) -> dict:
    """Top-1 / top-5 accuracy (%) and mean loss on ``val_set``; each process scores a disjoint shard.

    ``classifier`` is the bare ``LinearClassifier`` (not its DDP wrapper): scoring needs no collective.
    """
    distributed = dist_info is not None and dist_info.enabled
    shard = Subset(val_set, range(dist_info.rank, len(val_set), dist_info.world_size)) if distributed else val_set
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    classifier.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss sum, count
    for images, targets in progress(loader, "linear probe val", dist_info):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device):
            features = probe_input(backbone(images, n_last_blocks), avgpool)
        logits = classifier(features)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        sums += torch.stack(
            [
                top[:, 0].sum(),
                top.any(1).sum(),
                nn.functional.cross_entropy(logits, targets, reduction="sum"),
                torch.tensor(len(targets), device=device),
            ]
        ).double()
    if distributed:
        dist.all_reduce(sums)
    top1, top5, loss, count = sums.tolist()
    num_classes = classifier.linear.out_features
    return {"top1": 100 * top1 / count, "top5": 100 * top5 / count if num_classes > 5 else None, "loss": loss / count}


def linear_probe(
    backbone: FrozenBackbone,
    train_set,
    val_set,
    *,
    num_classes: int,
    n_last_blocks: int,
    avgpool: bool,
    epochs: int = 100,
    lr: float = 0.001,
    batch_size: int = 128,
    device: torch.device,
    num_workers: int = 0,
    dist_info: DistInfo | None = None,
    val_freq: int = 1,
    seed: int = 0,
    checkpoint_path: str | None = None,
    run_settings: dict | None = None,
) -> dict:
    """Train DINO's linear probe on ``train_set`` (items ``(augmented image, label)``) and score it on ``val_set``.

    Returns ``top1``/``top5``/``loss`` after the last epoch, ``best_top1`` with its ``best_epoch`` and the
    per-validation ``history``. With ``checkpoint_path`` the probe's state is written there atomically
    after each epoch and a restart resumes from it, provided it was written with the same settings
    (the probe's, plus ``run_settings``: what else identifies the run, e.g. weights and data).
    """
    positive("epochs", epochs)
    positive("val_freq", val_freq)
    dist_info = dist_info or DistInfo()
    main_process = dist_info.is_main
    seed_everything(seed + dist_info.rank)
    dim = backbone.embed_dim * (n_last_blocks + int(avgpool))
    classifier = LinearClassifier(dim, num_classes).to(device)
    trained = (
        DistributedDataParallel(classifier, device_ids=[device.index] if device.type == "cuda" else None)
        if dist_info.enabled
        else classifier
    )
    sampler = DistributedSampler(train_set, dist_info.world_size, dist_info.rank, shuffle=True, seed=seed)
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr * batch_size * dist_info.world_size / 256, momentum=0.9, weight_decay=0
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    settings = dict(
        num_classes=num_classes,
        n_last_blocks=n_last_blocks,
        avgpool=avgpool,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size * dist_info.world_size,
        seed=seed,
        **(run_settings or {}),
    )
    start_epoch, history = 0, []
    if checkpoint_path and os.path.exists(checkpoint_path):
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if state.get("settings") != settings:
            raise ValueError(
                f"{checkpoint_path} was written with {state.get('settings')}, not {settings}; "
                "use another --output_dir or delete it"
            )
        classifier.load_state_dict(state["classifier"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], state["history"]
        if main_process:
            print(f"resumed the linear probe from {checkpoint_path} at epoch {start_epoch}", flush=True)

    evaluation = dict(batch_size=batch_size, device=device, num_workers=num_workers, dist_info=dist_info)
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        trained.train()
        for images, targets in progress(loader, f"linear probe epoch {epoch + 1}/{epochs}", dist_info):
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.no_grad(), autocast(device):
                features = probe_input(backbone(images, n_last_blocks), avgpool)
            loss = nn.functional.cross_entropy(trained(features), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        if (epoch + 1) % val_freq == 0 or epoch + 1 == epochs:
            stats = validate(backbone, classifier, val_set, n_last_blocks=n_last_blocks, avgpool=avgpool, **evaluation)
            history.append({"epoch": epoch + 1, **stats})
            if main_process:
                print(f"linear probe epoch {epoch + 1}/{epochs}: val top-1 {stats['top1']:.2f}", flush=True)
        if main_process and checkpoint_path:
            state = {
                "classifier": classifier.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "history": history,
                "settings": settings,
            }
            save_atomic(state, checkpoint_path)
    final = history[-1]
    best = max(history, key=lambda record: record["top1"])
    return {
        "top1": final["top1"],
        "top5": final["top5"],
        "loss": final["loss"],
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
        "history": history,
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = commands.command_parser("adclr.eval_linear", __doc__, image_size=224, batch_size=128)
    parser.add_argument("--resize_size", type=int, help="val short side before the centre crop (default: 256/224 x)")
    parser.add_argument("--n_last_blocks", type=int, help="CLS tokens of this many last blocks (default: by width)")
    parser.add_argument(
        "--avgpool_patchtokens",
        type=parse_bool,
        help="also the mean patch token, true or false (default: by width)",
    )
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.001, help="learning rate at batch 256 (linearly scaled)")
    parser.add_argument("--val_freq", type=int, default=1, help="validate every N epochs (and after the last)")
    return parser


def run(args: argparse.Namespace) -> dict | None:
    """The command's work; returns the results on the main process (``None`` on the others)."""
    commands.check_sizes(args)
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    val_transform = eval_transform(args.image_size, args.resize_size)
    train_set, val_set = labelled_splits(args.data_path, train_transform(args.image_size), val_transform)
    backbone = commands.load_backbone(args)
    n_last_blocks, avgpool = default_probe_features(backbone)
    n_last_blocks = args.n_last_blocks or n_last_blocks
    avgpool = avgpool if args.avgpool_patchtokens is None else args.avgpool_patchtokens
    if not 1 <= n_last_blocks <= backbone.depth:
        raise ValueError(f"--n_last_blocks must be in [1, {backbone.depth}] for this backbone, got {n_last_blocks}")
    backbone, where, dist_info = commands.to_device(backbone, args)
    os.makedirs(args.output_dir, exist_ok=True)
    results = linear_probe(
        backbone,
        train_set,
        val_set,
        num_classes=len(train_set.classes),
        n_last_blocks=n_last_blocks,
        avgpool=avgpool,
        epochs=args.epochs,
        lr=args.lr,
        **where,
        val_freq=args.val_freq,
        seed=args.seed,
        checkpoint_path=os.path.join(args.output_dir, "linear_checkpoint.pth"),
        run_settings=dict(
            backbone=commands.backbone_description(args),
            data_path=os.path.abspath(args.data_path),
            image_size=args.image_size,
        ),
    )
    if not dist_info.is_main:
        return None
    report = {
        **commands.report_header(args, "linear probe on frozen features (DINO)"),
        "n_last_blocks": n_last_blocks,
        "avgpool_patchtokens": avgpool,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size_per_gpu * dist_info.world_size,
        "num_train": len(train_set),
        "num_val": len(val_set),
        "classes": train_set.classes,
        **results,
    }
    top5 = f", top-5 {results['top5']:.2f}" if results["top5"] is not None else ""
    summary = (
        f"linear probe ({n_last_blocks} CLS{' + avgpool' if avgpool else ''}, {args.epochs} epochs) on "
        f"{len(val_set)} val images: top-1 {results['top1']:.2f}{top5} "
        f"(best top-1 {results['best_top1']:.2f} at epoch {results['best_epoch']})"
    )
    return commands.publish(args, "eval_linear.json", report, summary)


def main(argv=None) -> None:
    """``python -m adclr.eval_linear`` with ``argv`` (default: the command line)."""
    commands.run_command(get_args_parser(), argv, run)
