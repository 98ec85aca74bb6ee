"""DINO's multi-crop augmentation plus ADCLR's query crops, on ``torchvision.transforms.v2``.

One image gives 2 global crops, ``local_crops_number`` local crops and ``num_query`` query crops. Query
crops are cut from the original image (not from a view) and resized to one patch; both global views
receive the same query crops, so the two teachers/students see the same regions as tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from .config import PRESETS, TrainConfig, check_field, field_default

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _blur(size: int, p: float, sigma: tuple[float, float]) -> v2.Transform:
    """DINO's Gaussian blur with probability ``p``; kernel about a tenth of the crop."""
    kernel = max(3, 2 * (size // 20) + 1)
    return v2.RandomApply([v2.GaussianBlur(kernel_size=kernel, sigma=sigma)], p=p)


# The settings a run's config also holds (``adclr.config``): their defaults are the paper preset's, read from there.
_RUN_FIELDS = {
    "global_size": "data",
    "local_size": "data",
    "global_crops_scale": "data",
    "local_crops_scale": "data",
    "local_crops_number": "data",
    "num_query": "data",
    "query_scale": "data",
    "patch_size": "model",
}


def _paper(name: str):
    """The paper recipe's value of run setting ``name``: its preset value, else its config default."""
    return PRESETS["paper"].get(name, field_default(name))


@dataclass
class MultiCropConfig:
    """The augmentation's settings: the run's crop settings (checked as the run config checks them, with
    the paper's values as defaults; ``from_train_config`` takes a run's), and DINO's colour recipe."""

    global_size: int = _paper("global_size")
    local_size: int = _paper("local_size")
    global_crops_scale: tuple[float, float] = _paper("global_crops_scale")
    local_crops_scale: tuple[float, float] = _paper("local_crops_scale")
    local_crops_number: int = _paper("local_crops_number")
    num_query: int = _paper("num_query")
    query_scale: tuple[float, float] = _paper("query_scale")
    query_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    patch_size: int = _paper("patch_size")
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, local
    # DINO's sigma range (0.1, 2) px is for 224 px global crops; smaller images get it scaled by global_size / 224
    # (at 48 px a 2 px blur would wipe out shapes a few patches wide).
    blur_sigma: tuple[float, float] | None = None
    solarize_p: float = 0.2  # second global view only
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in _RUN_FIELDS:
            check_field(name, getattr(self, name))

    @classmethod
    def from_train_config(cls, config: TrainConfig) -> MultiCropConfig:
        """The augmentation of a run: its crop settings, DINO's colour recipe."""
        return cls(**{name: getattr(getattr(config, group), name) for name, group in _RUN_FIELDS.items()})


class MultiCropAugmentation:
    """Callable on a PIL image or a uint8 ``[C, H, W]`` tensor; returns a dict:

    ``crops`` (list of 2 global then local ``[3, s, s]`` float tensors) and ``query_crops``
    ``[Q, 3, p, p]``, cut at ``query_boxes(image)`` by ``crop_queries`` (which pictures use as well).
    """

    def __init__(self, config: MultiCropConfig | None = None):
        self.config = cfg = config or MultiCropConfig()
        flip_and_color = v2.Compose(
            [
                v2.RandomHorizontalFlip(p=0.5),
                v2.RandomApply([v2.ColorJitter(*cfg.color_jitter)], p=cfg.color_jitter_p),
                v2.RandomGrayscale(p=cfg.grayscale_p),
            ]
        )
        self.normalize = v2.Compose(
            [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
        )
        bicubic = InterpolationMode.BICUBIC

        def crop(size, scale):
            return v2.RandomResizedCrop(size, scale=scale, interpolation=bicubic, antialias=True)

        g, l_ = cfg.global_size, cfg.local_size
        sigma = cfg.blur_sigma or (0.1 * min(1.0, g / 224), 2.0 * min(1.0, g / 224))
        self.global1 = v2.Compose(
            [crop(g, cfg.global_crops_scale), flip_and_color, _blur(g, cfg.blur_p[0], sigma), self.normalize]
        )
        self.global2 = v2.Compose(
            [
                crop(g, cfg.global_crops_scale),
                flip_and_color,
                _blur(g, cfg.blur_p[1], sigma),
                v2.RandomSolarize(threshold=128, p=cfg.solarize_p),
                self.normalize,
            ]
        )
        self.local = v2.Compose(
            [crop(l_, cfg.local_crops_scale), flip_and_color, _blur(l_, cfg.blur_p[2], sigma), self.normalize]
        )

    def query_boxes(self, image: Image.Image) -> torch.Tensor:
        """``num_query`` random boxes of ``image`` with areas in ``query_scale``: ``[Q, 4]`` (top, left, height,
        width in pixels)."""
        cfg = self.config
        scale, ratio = list(cfg.query_scale), list(cfg.query_ratio)
        boxes = [v2.RandomResizedCrop.get_params(image, scale, ratio) for _ in range(cfg.num_query)]
        return torch.tensor(boxes, dtype=torch.long).reshape(-1, 4)

    def crop_queries(self, image: Image.Image, boxes: torch.Tensor) -> torch.Tensor:
        """The ``boxes`` of ``image``, each resized to one patch and normalised: ``[len(boxes), 3, p, p]``."""
        p = self.config.patch_size
        crops = [
            self.normalize(v2.functional.resized_crop(image, *box, [p, p], InterpolationMode.BICUBIC, antialias=True))
            for box in boxes.tolist()
        ]
        return torch.stack(crops).as_subclass(torch.Tensor) if crops else torch.empty(0, 3, p, p)

    def __call__(self, image) -> dict:
        # PIL is torchvision's fastest backend for these small per-image ops (colour jitter above all).
        if isinstance(image, torch.Tensor):
            image = v2.functional.to_pil_image(image)
        image = image.convert("RGB")
        crops = [self.global1(image), self.global2(image)]
        crops += [self.local(image) for _ in range(self.config.local_crops_number)]
        query_crops = self.crop_queries(image, self.query_boxes(image))
        return {"crops": [c.as_subclass(torch.Tensor) for c in crops], "query_crops": query_crops}
