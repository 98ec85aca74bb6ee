"""The evaluation ``train.py`` runs: ``evaluate_run`` turns a run's ``TrainConfig`` into an ``EvalConfig`` (the one
place that maps the trainer's settings to the evaluation's) and ``evaluate_backbone`` scores a backbone with the
k-NN and, on the built-in scenes, the dense probe; ``run_summary`` is the run's closing line."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import TrainConfig, field_default
from ..data import SEGMENTATION_CLASSES, SyntheticScenes
from ..distributed import DistInfo
from ..errors import UserError
from .features import as_frozen, eval_transform, labelled_splits
from .knn import TEMPERATURE, knn_evaluate
from .seg import seg_probe, seg_transform


@dataclass
class EvalConfig:
    """What ``evaluate_backbone`` evaluates on, and how.

    ``data_path``: a folder with ``train/`` and ``val/`` ImageFolder trees for the k-NN; ``None`` uses
    the built-in scenes (``builtin_*`` sizes at ``image_size`` px, ``seed``; val from
    ``builtin_eval_split``: ``test``, or ``holdout`` for choosing settings) and adds the dense probe on
    their masks (the first half of the train scenes, every val scene). The scenes
    are generated in memory (a few milliseconds each, cached); reading them from ``write_scenes``
    folders through the commands' datasets gives the same numbers (tests/test_eval_*.py check it).
    The settings a training run also has default to the trainer's defaults (``adclr.config``).
    """

    data_path: str | None = None
    image_size: int = 224
    resize_size: int | None = None  # None: DINO's image_size * 256 / 224
    k: int = 20
    temperature: float = TEMPERATURE
    batch_size: int = 128
    num_workers: int = 0
    seed: int = field_default("seed")
    builtin_train_size: int = field_default("builtin_train_size")
    builtin_test_size: int = field_default("builtin_test_size")
    builtin_eval_split: str = field_default("builtin_eval_split")  # or "holdout": unseen train-distribution scenes
    seg_epochs: int = 10  # the dense probe on the built-in masks: small images, so larger batches
    seg_lr: float = 1e-2
    seg_batch_size: int = 64


def evaluate_backbone(
    backbone: nn.Module, config: EvalConfig, device: torch.device, dist_info: DistInfo | None = None
) -> dict[str, float]:
    """The trainer's periodic and final evaluation of ``backbone`` (ADCLR's ViT or a timm ViT).

    Returns ``knn_top1`` and ``knn_top5`` (weighted k-NN on the CLS token, ``config.k`` neighbours,
    ``eval_knn``'s code; top-5 only with more than 5 classes) and, on the built-in data,
    ``dense_miou`` (``eval_seg``'s linear segmentation probe on the scenes' masks). Seeded: the same
    backbone gives the same numbers, and the caller's random state is left untouched. Without
    ``dist_info`` it runs in the calling process alone (no collectives); with torchrun's ``dist_info``
    every process must call it: each extracts a shard of the images and every one gets the same
    results. The backbone's train/eval mode is restored.
    """
    was_training = backbone.training
    frozen = as_frozen(backbone).eval()
    transform = eval_transform(config.image_size, config.resize_size)
    size, seed, split = config.image_size, config.seed, config.builtin_eval_split
    if config.data_path:
        train_set, val_set = labelled_splits(config.data_path, transform, transform)
    else:
        train_set = SyntheticScenes(config.builtin_train_size, size, "train", seed, transform)
        val_set = SyntheticScenes(config.builtin_test_size, size, split, seed, transform)
    where = dict(device=device, num_workers=config.num_workers, dist_info=dist_info)
    knn = knn_evaluate(
        frozen,
        train_set,
        val_set,
        num_classes=len(train_set.classes),
        ks=(config.k,),
        temperature=config.temperature,
        batch_size=config.batch_size,
        **where,
    )
    results = {"knn_top1": knn[config.k]["top1"]}
    if knn[config.k]["top5"] is not None:
        results["knn_top5"] = knn[config.k]["top5"]
    if not config.data_path:  # half the train scenes keep the probe's cost down
        seg_train_transform, seg_val_transform = seg_transform(size, resize_mask=True), seg_transform(size)
        seg = seg_probe(
            frozen,
            SyntheticScenes(config.builtin_train_size // 2, size, "train", seed, seg_train_transform, "mask"),
            SyntheticScenes(config.builtin_test_size, size, split, seed, seg_val_transform, "mask"),
            num_classes=len(SEGMENTATION_CLASSES),
            epochs=config.seg_epochs,
            lr=config.seg_lr,
            batch_size=config.seg_batch_size,
            extract_batch_size=config.batch_size,
            seed=seed,
            **where,
        )
        results["dense_miou"] = seg["miou"]
    backbone.train(was_training)
    return results


def evaluate_run(cfg: TrainConfig, backbone: nn.Module, device: torch.device, name: str, dist_info: DistInfo) -> dict:
    """``evaluate_backbone`` as run ``cfg`` asks: weighted k-NN on CLS features (``--eval_data_path``, else the
    built-in scenes, which add the linear segmentation probe on patch features); keys carry ``name`` (teacher or
    random_init). Every process calls it under torchrun: the images are sharded over them. A bad evaluation
    folder is the user's error (``UserError`` naming ``--eval_data_path``)."""
    eval_data_path = cfg.run.eval_data_path
    config = EvalConfig(
        data_path=eval_data_path,
        image_size=cfg.data.global_size,
        resize_size=None if eval_data_path else cfg.data.global_size,  # DINO's 256/224 resize on real images
        num_workers=cfg.data.num_workers if eval_data_path else 0,  # the built-in scenes are made in memory
        builtin_train_size=cfg.data.builtin_train_size,
        builtin_test_size=cfg.data.builtin_test_size,
        seed=cfg.run.seed,
        builtin_eval_split=cfg.run.builtin_eval_split,
    )
    try:
        results = evaluate_backbone(backbone, config, device, dist_info)
    except ValueError as error:  # the evaluation folder's images (no image in a class, an unreadable one)
        if not eval_data_path:
            raise
        raise UserError(f"--eval_data_path {eval_data_path}: {error}") from None
    return {f"{key}_{name}": value for key, value in results.items()}


def run_summary(cfg: TrainConfig, evaluation: dict) -> str:
    """One line: the teacher's metrics next to the same architecture at random initialisation."""
    where = cfg.run.eval_data_path or f"the built-in scenes ({cfg.run.builtin_eval_split} split)"
    chance = "" if cfg.run.eval_data_path else f", chance: {100 / SyntheticScenes.num_classes:.1f}%"
    line = (
        f"k-NN top-1 on {where}: {evaluation['knn_top1_teacher']:.1f}% "
        f"(random init: {evaluation['knn_top1_random_init']:.1f}%{chance})"
    )
    if "dense_miou_teacher" in evaluation:
        line += (
            f"; dense linear-probe mIoU: {evaluation['dense_miou_teacher']:.1f}% "
            f"(random init: {evaluation['dense_miou_random_init']:.1f}%)"
        )
    return line
