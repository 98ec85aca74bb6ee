"""What every evaluation reads from a frozen backbone, and on which images.

- ``eval_transform``: DINO's evaluation resize and centre crop.
- ``load_frozen_backbone``: a ``train.py`` checkpoint (teacher or student), an exported safetensors file,
  or a timm model name with local weights, so ADCLR and other backbones go through the same protocol.
- ``FrozenBackbone``: one interface over ADCLR's ViT and timm's ``VisionTransformer``: the CLS token, the
  CLS tokens of the last n blocks and the patch tokens, all after the final norm (as DINO reads them).
- ``labelled_splits``: the ``train/`` and ``val/`` ImageFolder trees of a data folder, checked to agree.
- ``extract_features``: batched, bf16 on CUDA, sharded over torchrun processes and gathered back into
  dataset order, so many GPUs give what one gives.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

from ..augment import IMAGENET_MEAN, IMAGENET_STD
from ..checkpoint import BRANCHES, load_backbone
from ..data import LabelledImages, check_same_classes
from ..distributed import DistInfo
from ..export import load_exported
from ..kernels.device import capability, supports_bf16

# ---- transforms ------------------------------------------------------------------------------------


def eval_transform(image_size: int = 224, resize_size: int | None = None) -> v2.Compose:
    """DINO's evaluation transform: bicubic resize of the short side to ``resize_size`` (default
    ``image_size * 256 / 224``, i.e. 256 for 224), centre crop ``image_size``, ImageNet normalisation.

    The image becomes a uint8 tensor first, so a PIL image and the same pixels as a tensor give the
    same result (the built-in data is served as tensors, folders as PIL images).
    """
    if resize_size is None:
        resize_size = round(image_size * 256 / 224)
    if resize_size < image_size:
        raise ValueError(f"resize_size ({resize_size}) must be at least image_size ({image_size})")
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


# ---- backbones -------------------------------------------------------------------------------------


@dataclass
class BackboneFeatures:
    """A batch's tokens after the final norm."""

    cls: torch.Tensor  # [B, C]: the last block's CLS token
    cls_blocks: torch.Tensor  # [B, n, C]: the CLS token of each of the last n blocks (last = ``cls``)
    patches: torch.Tensor  # [B, H/p * W/p, C]: the last block's patch tokens, row-major
    grid: tuple[int, int]  # (H/p, W/p)


class FrozenBackbone(nn.Module):
    """ADCLR's ViT or any timm ``VisionTransformer`` (or a model with the same ``forward_intermediates``),
    read through timm's ``forward_intermediates`` with the final norm applied to every block taken."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not hasattr(model, "forward_intermediates") or not getattr(model, "has_class_token", False):
            raise ValueError(
                "the backbone must be a ViT with a CLS token and timm's forward_intermediates; "
                f"got {type(model).__name__}"
            )
        self.model = model
        patch = model.patch_embed.patch_size
        self.patch_size = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        self.embed_dim = model.embed_dim
        self.depth = len(model.blocks)
        self.train(model.training)

    def forward(self, images: torch.Tensor, n_last_blocks: int = 1) -> BackboneFeatures:
        if not 1 <= n_last_blocks <= self.depth:
            raise ValueError(f"n_last_blocks must be in [1, {self.depth}] for this backbone, got {n_last_blocks}")
        taken = self.model.forward_intermediates(
            images,
            indices=n_last_blocks,
            return_prefix_tokens=True,
            norm=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        cls_blocks = torch.stack([prefix[:, 0] for _, prefix in taken], dim=1)
        return BackboneFeatures(cls=cls_blocks[:, -1], cls_blocks=cls_blocks, patches=taken[-1][0], grid=grid)


def as_frozen(backbone: nn.Module) -> FrozenBackbone:
    return backbone if isinstance(backbone, FrozenBackbone) else FrozenBackbone(backbone)


def load_frozen_backbone(weights: str, which: str = "teacher", arch: str | None = None) -> FrozenBackbone:
    """The backbone to evaluate, in eval mode with frozen parameters, from one of:

    - a ``train.py`` checkpoint: its ``which`` network (``teacher`` or ``student``);
    - a ``.safetensors`` file written by ``python -m adclr.export``;
    - with ``arch``: the timm model ``arch`` with the weights in ``weights`` (a state dict in any format
      timm reads, e.g. DINO's published backbones with ``arch="vit_small_patch16_224.dino"``); nothing
      is downloaded.
    """
    if which not in BRANCHES:
        raise ValueError(f"which must be one of {BRANCHES}, got {which!r}")
    if not os.path.isfile(weights):
        raise ValueError(f"weights file {weights!r} does not exist")
    if arch:
        model = _load_timm(arch, weights)
    elif weights.endswith(".safetensors"):
        try:
            model = load_exported(weights)
        except Exception as error:  # noqa: BLE001 - safetensors/json/timm errors all mean "not our export"
            raise ValueError(
                f"{weights!r} is not a backbone exported by adclr.export ({_one_line(error)}); "
                "for other safetensors weights give the timm architecture with --arch"
            ) from None
    else:
        try:
            model, _ = load_backbone(weights, which)
        except Exception as error:  # noqa: BLE001 - unpickling/key errors all mean "not a train.py checkpoint"
            raise ValueError(
                f"{weights!r} is not a train.py checkpoint ({_one_line(error)}); "
                "give a checkpoint.pth, an exported .safetensors file, or a timm --arch with its weights"
            ) from None
        model.set_attn_backend("auto")  # checkpoints rebuild on the reference path; evaluate on the fast one
    return FrozenBackbone(model.eval().requires_grad_(False))


def _load_timm(arch: str, weights: str) -> nn.Module:
    if ":" in arch:
        raise ValueError(f"arch must be a timm model name (no hub prefix, nothing is downloaded), got {arch!r}")
    try:
        return timm.create_model(
            arch,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=weights),
            num_classes=0,
            dynamic_img_size=True,
        )
    except Exception as error:  # noqa: BLE001 - unknown name, unreadable file, mismatched keys
        message = f"cannot build timm model {arch!r} from {weights!r}: {_one_line(error)}"
        raise ValueError(message) from None


def _one_line(error: Exception, limit: int = 400) -> str:
    """``error`` as one line of at most ``limit`` characters (load_state_dict lists every mismatch)."""
    text = f"{type(error).__name__}: {' '.join(str(error).split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- checks and data ------------------------------------------------------------------------------


def positive(name: str, value, minimum=1) -> None:
    """Refuse ``value`` below ``minimum``, naming it ``name``."""
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def split_folders(data_path: str) -> tuple[str, str]:
    """``data_path``'s ``train/`` and ``val/`` folders (a missing one is refused by the dataset reading it)."""
    if not os.path.isdir(data_path):
        raise ValueError(f"data_path {data_path!r} is not a folder; expected a folder with train/ and val/")
    return os.path.join(data_path, "train"), os.path.join(data_path, "val")


def labelled_splits(data_path: str, train_transform, val_transform) -> tuple[LabelledImages, LabelledImages]:
    """The ``train/`` and ``val/`` ImageFolder trees of ``data_path``, refused unless their classes agree."""
    train_dir, val_dir = split_folders(data_path)
    train_set, val_set = LabelledImages(train_dir, train_transform), LabelledImages(val_dir, val_transform)
    check_same_classes(train_set.classes, val_set.classes)
    return train_set, val_set


# ---- feature extraction ----------------------------------------------------------------------------


def autocast(device: torch.device):
    """Half-precision autocast on CUDA (bf16, or fp16 where bf16 is emulated: V100); full precision
    elsewhere (CPUs without bf16 units run it slower)."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if supports_bf16(capability(device)) else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def progress(iterable, desc: str, dist_info: DistInfo | None = None, **kwargs):
    """A tqdm bar on the main process when stderr is a terminal; silent otherwise (logs, other ranks)."""
    main = dist_info is None or dist_info.is_main
    return tqdm(iterable, desc=desc, disable=not (main and sys.stderr.isatty()), dynamic_ncols=True, **kwargs)


class _Indexed(Dataset):
    """``(item..., index)``: the index travels with the batch so gathered rows land in dataset order."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return *self.dataset[index], index


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def extract_features(
    fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    dist_info: DistInfo | None = None,
    dtype: torch.dtype = torch.float32,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(images)`` over ``dataset`` (items ``(image tensor, target)``): ``(features [N, ...], targets [N, ...])``
    on the CPU in ``dtype``, in dataset order, on every process.

    Under torchrun each process extracts one shard (``DistributedSampler``, padded to equal shards) and
    every batch is all-gathered with its dataset indices, as DINO's ``eval_knn.py`` does; padding
    repeats an image, which writes the same row twice. Targets must collate to tensors of one shape.
    """
    distributed = dist_info is not None and dist_info.enabled
    sampler = DistributedSampler(dataset, dist_info.world_size, dist_info.rank, shuffle=False) if distributed else None
    loader = DataLoader(
        _Indexed(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # leaves the caller's random stream alone
    )
    features = targets = None
    for images, batch_targets, index in progress(loader, desc, dist_info):
        with autocast(device):
            out = fn(images.to(device, non_blocking=True))
        out, batch_targets, index = out.to(dtype), torch.as_tensor(batch_targets), torch.as_tensor(index)
        if distributed:
            comm = torch.device("cpu") if dist.get_backend() == "gloo" else device
            index = _all_gather(index.to(comm))
            out = _all_gather(out.to(comm))
            batch_targets = _all_gather(batch_targets.to(comm))
        if features is None:
            features = torch.empty(len(dataset), *out.shape[1:], dtype=dtype)
            targets = torch.empty(len(dataset), *batch_targets.shape[1:], dtype=batch_targets.dtype)
        index = index.cpu()
        features.index_copy_(0, index, out.cpu())
        targets.index_copy_(0, index, batch_targets.cpu())
    return features, targets
