"""Evaluation of a backbone: DINO's weighted k-NN on CLS features, and patch-feature k-NN segmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from .augment import IMAGENET_MEAN, IMAGENET_STD
from .data import SyntheticShapes


def eval_transform(size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


@torch.no_grad()
def extract_features(backbone, dataset, batch_size: int, device, patches: bool = False):
    """L2-normalised CLS features ``[N, C]`` (or patch features ``[N, P, C]``) and labels ``[N]``."""
    backbone.eval()
    features, labels = [], []
    for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        out = backbone(images.to(device))
        features.append(F.normalize((out.patches if patches else out.cls).float(), dim=-1).cpu())
        labels.append(torch.as_tensor(targets))
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_classify(
    train_features, train_labels, test_features, num_classes: int, k: int = 20, T: float = 0.07, chunk: int = 1024
) -> torch.Tensor:
    """DINO's weighted k-NN: cosine similarity, top-k neighbours voting with weight exp(sim / T).

    Features must be L2-normalised. Test rows are processed in chunks, so any test-set size works;
    ``k`` is capped at the train-set size. Returns predicted labels ``[N_test]``.
    """
    k = min(k, train_features.shape[0])
    predictions = []
    for start in range(0, test_features.shape[0], chunk):
        similarity = test_features[start : start + chunk] @ train_features.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        votes = torch.zeros(top_sim.shape[0], num_classes, dtype=top_sim.dtype)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / T).exp())
        predictions.append(votes.argmax(1))
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def knn_accuracy(
    backbone, train_set, test_set, num_classes: int, device, batch_size: int = 128, k: int = 20, T: float = 0.07
) -> float:
    """Top-1 accuracy (%) of weighted k-NN on the backbone's CLS features."""
    train_f, train_y = extract_features(backbone, train_set, batch_size, device)
    test_f, test_y = extract_features(backbone, test_set, batch_size, device)
    predictions = knn_classify(train_f, train_y, test_f, num_classes, k, T)
    return 100.0 * (predictions == test_y).float().mean().item()


def mean_iou(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean intersection-over-union (%) over the classes present in prediction or target."""
    ious = []
    for c in range(num_classes):
        union = ((prediction == c) | (target == c)).sum()
        if union > 0:
            ious.append(((prediction == c) & (target == c)).sum().float() / union)
    return 100.0 * torch.stack(ious).mean().item()


class _WithMasks(torch.utils.data.Dataset):
    def __init__(self, dataset: SyntheticShapes, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, mask, _ = self.dataset.generate(index)
        return self.transform(image), mask


def dense_knn_miou(
    backbone,
    train_set: SyntheticShapes,
    test_set: SyntheticShapes,
    image_size: int,
    device,
    k: int = 20,
    T: float = 0.07,
    max_train_patches: int = 50_000,
) -> float:
    """Segmentation by k-NN over patch features: each test patch takes its neighbours' patch labels.

    A train patch's label is the majority class of its pixels; predictions are upsampled to pixels
    (nearest) and scored by mIoU over background + shape classes.
    """
    transform = eval_transform(image_size)
    train_f, train_masks = extract_features(backbone, _WithMasks(train_set, transform), 128, device, patches=True)
    test_f, test_masks = extract_features(backbone, _WithMasks(test_set, transform), 128, device, patches=True)
    num_classes = SyntheticShapes.num_classes + 1
    grid = int(train_f.shape[1] ** 0.5)

    def patch_labels(masks):
        one_hot = F.one_hot(masks, num_classes).permute(0, 3, 1, 2).float()
        return F.adaptive_avg_pool2d(one_hot, grid).argmax(1).flatten(1)

    train_f, train_y = train_f.flatten(0, 1), patch_labels(train_masks).flatten()
    if train_f.shape[0] > max_train_patches:
        keep = torch.randperm(train_f.shape[0], generator=torch.Generator().manual_seed(0))[:max_train_patches]
        train_f, train_y = train_f[keep], train_y[keep]
    predicted = knn_classify(train_f, train_y, test_f.flatten(0, 1), num_classes, k, T).view(-1, 1, grid, grid)
    pixels = F.interpolate(predicted.float(), size=test_masks.shape[-2:], mode="nearest").long()[:, 0]
    return mean_iou(pixels, test_masks, num_classes)
