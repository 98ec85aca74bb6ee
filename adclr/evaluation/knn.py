"""DINO's weighted k-NN evaluation of a frozen backbone on any ImageFolder train/val pair.

    python -m adclr.eval_knn --weights runs/adclr/checkpoint.pth --data_path /data/imagenet
    torchrun --nproc_per_node 8 -m adclr.eval_knn --weights backbone.safetensors --data_path /data/imagenet
    python -m adclr.eval_knn --arch vit_small_patch16_224.dino --weights dino_deitsmall16_pretrain.pth \\
        --data_path /data/imagenet

Protocol (Caron et al. 2021, ``eval_knn.py``): the teacher's CLS token after the final norm,
L2-normalised; each val image takes its k most cosine-similar train images, which vote for their
class with weight exp(similarity / T), T = 0.07; top-1 and top-5 for k in {10, 20, 100, 200}. Images
are resized (short side 256, bicubic) and centre-cropped to 224 (``--image_size`` scales both).
Similarities are computed in blocks of val and train rows, so memory stays bounded for any train set.
Writes ``eval_knn.json`` to ``--output_dir`` and prints a one-line summary.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ..distributed import DistInfo
from . import commands
from .features import FrozenBackbone, eval_transform, extract_features, labelled_splits

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07  # DINO's T in the vote weight exp(similarity / T)


@torch.no_grad()
def knn_votes(
    train_features, train_labels, test_features, num_classes: int, ks=KS, temperature=TEMPERATURE, train_chunk=65536
) -> dict[int, torch.Tensor]:
    """Weighted votes ``[N_test, num_classes]`` of the test rows ``test_features [N_test, C]`` for each k in ``ks``,
    from the train rows ``train_features [N_train, C]`` labelled ``train_labels [N_train]``.

    Each test row keeps a running top-``max(ks)`` over blocks of ``train_chunk`` train rows, so the
    similarity matrix never exceeds ``N_test x (train_chunk + max(ks))``. Features must be
    L2-normalised; k above the train-set size uses the whole train set.
    """
    num_train = train_features.shape[0]
    k_max = min(max(ks), num_train)
    best_sim = test_features.new_empty(test_features.shape[0], 0)
    best_idx = torch.empty(test_features.shape[0], 0, dtype=torch.long, device=test_features.device)
    for start in range(0, num_train, train_chunk):
        similarity = test_features @ train_features[start : start + train_chunk].T
        sim, idx = similarity.topk(min(k_max, similarity.shape[1]), dim=1)
        best_sim, order = torch.cat([best_sim, sim], 1).topk(min(k_max, best_sim.shape[1] + sim.shape[1]), dim=1)
        best_idx = torch.cat([best_idx, idx + start], 1).gather(1, order)
    neighbour_labels = train_labels[best_idx]
    weights = (best_sim / temperature).exp()
    votes = {}
    for k in ks:
        k = min(k, num_train)
        votes_k = torch.zeros(test_features.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes[k] = votes_k.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
    return votes


@torch.no_grad()
def weighted_knn(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    ks=KS,
    temperature: float = TEMPERATURE,
    test_chunk: int = 1024,
    train_chunk: int = 65536,
) -> dict[int, dict]:
    """Top-1 and top-5 accuracy (%) of the weighted k-NN classifier for each k (k capped at the train size).

    A class counts in the top 5 only if it received a vote, so classes tied at zero never decide a hit;
    top-5 is ``None`` with 5 classes or fewer (it would be 100 % by construction).
    """
    for name, value in (("test_chunk", test_chunk), ("train_chunk", train_chunk), ("temperature", temperature)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    top1 = dict.fromkeys(ks, 0)
    top5 = dict.fromkeys(ks, 0)
    for start in range(0, test_features.shape[0], test_chunk):
        targets = test_labels[start : start + test_chunk]
        votes = knn_votes(
            train_features,
            train_labels,
            test_features[start : start + test_chunk],
            num_classes,
            ks,
            temperature,
            train_chunk,
        )
        for k in ks:
            values, classes = votes[min(k, train_features.shape[0])].topk(min(5, num_classes), dim=1)
            hit = (classes == targets[:, None]) & (values > 0)
            top1[k] += hit[:, 0].sum().item()
            top5[k] += hit.any(1).sum().item()
    total = test_features.shape[0]
    return {
        k: {"top1": 100.0 * top1[k] / total, "top5": 100.0 * top5[k] / total if num_classes > 5 else None} for k in ks
    }


def knn_evaluate(
    backbone: FrozenBackbone,
    train_set,
    val_set,
    *,
    num_classes: int,
    ks=KS,
    temperature: float = TEMPERATURE,
    batch_size: int = 128,
    device: torch.device,
    num_workers: int = 0,
    dist_info: DistInfo | None = None,
) -> dict[int, dict]:
    """Extract the L2-normalised CLS features of both sets and run ``weighted_knn`` on ``device``.

    The datasets yield ``(transformed image, label)``. Under torchrun every process extracts a shard and
    receives all features; every process computes the same result (it is cheap next to extraction).
    """

    def cls_features(images: torch.Tensor) -> torch.Tensor:
        return backbone(images).cls

    loader = dict(batch_size=batch_size, device=device, num_workers=num_workers, dist_info=dist_info)
    train_f, train_y = extract_features(cls_features, train_set, desc="k-NN train features", **loader)
    val_f, val_y = extract_features(cls_features, val_set, desc="k-NN val features", **loader)
    train_f, val_f = (F.normalize(f.to(device), dim=1) for f in (train_f, val_f))
    return weighted_knn(train_f, train_y.to(device), val_f, val_y.to(device), num_classes, ks, temperature)


def get_args_parser() -> argparse.ArgumentParser:
    parser = commands.command_parser("adclr.eval_knn", __doc__, image_size=224, batch_size=128)
    parser.add_argument("--resize_size", type=int, help="short side before the crop (default: image_size*256/224)")
    parser.add_argument("--nb_knn", type=int, nargs="+", default=list(KS), help="values of k")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE, help="T in the vote weight exp(sim / T)")
    return parser


def run(args: argparse.Namespace) -> dict | None:
    """The command's work; returns the results on the main process (``None`` on the others)."""
    commands.check_sizes(args)
    if min(args.nb_knn) < 1:
        raise ValueError(f"--nb_knn values must be positive, got {args.nb_knn}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}")
    transform = eval_transform(args.image_size, args.resize_size)
    train_set, val_set = labelled_splits(args.data_path, transform, transform)
    backbone, where, dist_info = commands.to_device(commands.load_backbone(args), args)
    settings = dict(num_classes=len(train_set.classes), ks=tuple(args.nb_knn), temperature=args.temperature)
    results = knn_evaluate(backbone, train_set, val_set, **settings, **where)
    if not dist_info.is_main:
        return None
    report = {
        **commands.report_header(args, "weighted k-NN on L2-normalised CLS features (DINO)"),
        "temperature": args.temperature,
        "num_train": len(train_set),
        "num_val": len(val_set),
        "classes": train_set.classes,
        "results": {str(k): v for k, v in results.items()},
    }
    scores = ", ".join(
        f"{k}-NN {v['top1']:.2f}" + (f" / {v['top5']:.2f}" if v["top5"] is not None else "") for k, v in results.items()
    )
    top5 = " / top-5" if len(train_set.classes) > 5 else ""
    summary = f"k-NN top-1{top5} on {len(val_set)} val images ({len(train_set.classes)} classes): {scores}"
    return commands.publish(args, "eval_knn.json", report, summary)


def main(argv=None) -> None:
    """``python -m adclr.eval_knn`` with ``argv`` (default: the command line)."""
    commands.run_command(get_args_parser(), argv, run)
