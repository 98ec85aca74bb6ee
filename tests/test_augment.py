"""Multi-crop + query-crop augmentation: shapes, shared query crops, crop areas, reproducibility."""

import pytest
import torch

from adclr.augment import MultiCropAugmentation, MultiCropConfig

CONFIG = MultiCropConfig(global_size=48, local_size=24, local_crops_number=3, num_query=6, patch_size=8)


def image(h=70, w=90):
    return (torch.rand(3, h, w) * 255).to(torch.uint8)


def test_shapes_and_dtypes():
    out = MultiCropAugmentation(CONFIG)(image())
    assert [tuple(c.shape) for c in out["crops"]] == [(3, 48, 48)] * 2 + [(3, 24, 24)] * 3
    assert all(c.dtype == torch.float32 and type(c) is torch.Tensor for c in out["crops"])
    assert out["query_crops"].shape == (6, 3, 8, 8) and out["query_crops"].dtype == torch.float32
    assert set(out) == {"crops", "query_crops"}
    assert MultiCropAugmentation(CONFIG).query_boxes(image()).shape == (6, 4)


def test_query_crop_areas_lie_in_the_configured_range():
    img = image(100, 120)
    boxes = torch.cat([MultiCropAugmentation(CONFIG).query_boxes(img) for _ in range(20)])
    top, left, h, w = boxes.T
    area = (h * w).float() / (100 * 120)
    lo, hi = CONFIG.query_scale
    # get_params samples the area in [lo, hi] then rounds the side lengths to whole pixels.
    assert (area >= lo * 0.9).all() and (area <= hi * 1.1).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 100).all() and (left + w <= 120).all()


def test_query_crops_are_the_regions_of_the_original_image():
    """Both global views share one set of query crops, cut from the source image at the boxes."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    aug = MultiCropAugmentation(CONFIG)
    img = image()
    sampled, sample = [], aug.query_boxes
    aug.query_boxes = lambda image: sampled.append(sample(image)) or sampled[-1]  # record the call's boxes
    out = aug(img)
    t, l_, h, w = sampled[0][2].tolist()
    expected = aug.normalize(F.resized_crop(img, t, l_, h, w, [8, 8], InterpolationMode.BICUBIC, antialias=True))
    assert torch.allclose(out["query_crops"][2], expected)


def test_reproducible_under_a_fixed_seed():
    aug, img = MultiCropAugmentation(CONFIG), image()
    torch.manual_seed(3)
    a = aug(img)
    torch.manual_seed(3)
    b = aug(img)
    torch.manual_seed(4)
    c = aug(img)
    assert all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"]))
    assert torch.equal(a["query_crops"], b["query_crops"])
    assert not torch.equal(a["query_crops"], c["query_crops"])


def test_grayscale_and_pil_inputs():
    from PIL import Image

    aug = MultiCropAugmentation(CONFIG)
    assert aug(image()[:1])["crops"][0].shape == (3, 48, 48)
    pil = Image.fromarray(image().permute(1, 2, 0).numpy())
    assert aug(pil)["query_crops"].shape == (6, 3, 8, 8)


def test_bad_scale_raises():
    with pytest.raises(ValueError, match="query_scale"):
        MultiCropAugmentation(MultiCropConfig(query_scale=(0.2, 0.1)))


def _describe(transform) -> list[tuple]:
    """A transform pipeline as a flat list of (step, parameters...) tuples."""
    from torchvision.transforms import InterpolationMode, v2

    if isinstance(transform, v2.Compose):
        return [step for t in transform.transforms for step in _describe(t)]
    if isinstance(transform, v2.RandomApply):
        (inner,) = transform.transforms
        return [(name, transform.p, *rest) for name, *rest in _describe(inner)]
    if isinstance(transform, v2.RandomResizedCrop):
        assert transform.interpolation == InterpolationMode.BICUBIC
        return [("crop", tuple(transform.size), tuple(transform.scale))]
    if isinstance(transform, v2.RandomHorizontalFlip):
        return [("flip", transform.p)]
    if isinstance(transform, v2.ColorJitter):
        ranges = (transform.brightness, transform.contrast, transform.saturation, transform.hue)
        return [("jitter", *(tuple(round(x, 6) for x in r) for r in ranges))]
    if isinstance(transform, v2.RandomGrayscale):
        return [("grayscale", transform.p)]
    if isinstance(transform, v2.GaussianBlur):
        return [("blur", tuple(transform.sigma))]
    if isinstance(transform, v2.RandomSolarize):
        return [("solarize", transform.p, transform.threshold)]
    if isinstance(transform, v2.Normalize):
        return [("normalize", tuple(transform.mean), tuple(transform.std))]
    return []  # ToImage, ToDtype: conversions


def test_views_follow_dinos_augmentation_recipe():
    """DINO's DataAugmentationDINO (BYOL's colour augmentations): global view 1 always blurred, view 2
    rarely blurred and sometimes solarized, local views blurred half the time; global and local scales."""
    aug = MultiCropAugmentation(MultiCropConfig())
    colour = [
        ("flip", 0.5),
        ("jitter", 0.8, (0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)),  # ColorJitter(0.4, 0.4, 0.2, 0.1)
        ("grayscale", 0.2),
    ]
    normalize = ("normalize", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert _describe(aug.global1) == [
        ("crop", (224, 224), (0.4, 1.0)),
        *colour,
        ("blur", 1.0, (0.1, 2.0)),
        normalize,
    ]
    assert _describe(aug.global2) == [
        ("crop", (224, 224), (0.4, 1.0)),
        *colour,
        ("blur", 0.1, (0.1, 2.0)),
        ("solarize", 0.2, 128),
        normalize,
    ]
    assert _describe(aug.local) == [("crop", (96, 96), (0.05, 0.4)), *colour, ("blur", 0.5, (0.1, 2.0)), normalize]
    assert (aug.config.num_query, aug.config.query_scale, aug.config.patch_size) == (10, (0.05, 0.15), 16)
    out = aug(image(300, 260))
    assert [tuple(c.shape) for c in out["crops"]] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 10
    assert out["query_crops"].shape == (10, 3, 16, 16)
    assert not torch.equal(out["crops"][0], out["crops"][1])  # two different augmentations of the image


def test_blur_strength_is_dinos_relative_to_the_image():
    """DINO's sigma range (0.1, 2) px belongs to 224 px global crops; a 48 px run blurs 48/224 as much (a 2 px
    blur would erase shapes a few patches wide), and an explicit range is taken as given."""

    def sigmas(aug):
        steps = [step for view in (aug.global1, aug.global2, aug.local) for step in _describe(view)]
        return {tuple(round(s, 6) for s in step[-1]) for step in steps if step[0] == "blur"}

    assert sigmas(MultiCropAugmentation(MultiCropConfig())) == {(0.1, 2.0)}
    small = MultiCropAugmentation(MultiCropConfig(global_size=48, local_size=16, patch_size=8))
    assert sigmas(small) == {(round(0.1 * 48 / 224, 6), round(2.0 * 48 / 224, 6))}
    explicit = MultiCropAugmentation(
        MultiCropConfig(global_size=48, local_size=16, patch_size=8, blur_sigma=(0.5, 1.0))
    )
    assert sigmas(explicit) == {(0.5, 1.0)}
