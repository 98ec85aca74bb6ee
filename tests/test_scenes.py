"""The built-in scenes (``adclr.data.SyntheticScenes``): deterministic, masks that match the pixels, balanced
classes, objects that span patches, and no class given away by a pixel statistic."""

import numpy as np
import pytest
import torch

from adclr.data import SEGMENTATION_CLASSES, SHAPES, SyntheticScenes

N = 240  # scenes per statistical check: 40 per class


@pytest.fixture(scope="module")
def scenes():
    data = SyntheticScenes(N, 48, "train", seed=3)
    return [data.generate(i) for i in range(N)]


def test_the_same_scene_every_time_and_a_new_one_for_another_seed_split_or_index():
    a, b = SyntheticScenes(8, 48, "train", seed=1), SyntheticScenes(8, 48, "train", seed=1)
    for i in range(8):
        (ia, ma, la), (ib, mb, lb) = a.generate(i), b.generate(i)
        assert torch.equal(ia, ib) and torch.equal(ma, mb) and la == lb
    first = a.generate(0)[0]
    for other in (
        SyntheticScenes(8, 48, "train", seed=2).generate(0)[0],
        SyntheticScenes(8, 48, "holdout", seed=1).generate(0)[0],
        SyntheticScenes(8, 48, "test", seed=1).generate(0)[0],
        a.generate(6)[0],  # same label (6 % 6 == 0), another scene
    ):
        assert not torch.equal(first, other)


def test_items_dtypes_and_a_changed_item_does_not_change_the_cache():
    data = SyntheticScenes(4, 40, "test", seed=0)
    image, label = data[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 40) and label == 1
    image.zero_()  # a caller's in-place edit must not reach the next read
    assert data[1][0].max() > 0
    masks = SyntheticScenes(4, 40, "test", seed=0, target="mask")
    image2, mask = masks[1]
    assert mask.dtype == torch.int64 and mask.shape == (40, 40) and torch.equal(image2, data[1][0])
    assert set(mask.unique().tolist()) <= set(range(len(SEGMENTATION_CLASSES)))


@pytest.mark.parametrize("bad", [dict(size=4), dict(size=48.0), dict(split="val"), dict(target="box")])
def test_bad_arguments_are_refused_by_name(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        SyntheticScenes(4, **{"size": 48, **bad})


def test_index_out_of_range_raises_index_error():
    with pytest.raises(IndexError):
        SyntheticScenes(4, 48).generate(4)


def test_mask_edges_are_image_edges(scenes):
    """Neighbouring pixels on either side of a mask boundary differ far more than pixels within a region:
    a mask shifted, transposed or from another scene fails this."""
    across, within = [], []
    for image, mask, _ in scenes[:60]:
        pixels = image.float().mean(0)
        for dim in (0, 1):
            step = pixels.diff(dim=dim).abs()
            boundary = mask.diff(dim=dim) != 0
            across.append(step[boundary])
            within.append(step[~boundary])
    across, within = torch.cat(across).mean(), torch.cat(within).mean()
    assert across > 2.5 * within, (across, within)
    shifted = [(image, mask.roll(3, dims=1), label) for image, mask, label in scenes[:60]]
    across_shifted = torch.cat(
        [img.float().mean(0).diff(dim=1).abs()[m.diff(dim=1) != 0] for img, m, _ in shifted]
    ).mean()
    assert across_shifted < 0.6 * across  # the check can tell a wrong mask


def test_the_label_is_the_largest_object_and_labels_are_balanced(scenes):
    labels = [label for _, _, label in scenes]
    assert np.bincount(labels, minlength=len(SHAPES)).tolist() == [N // len(SHAPES)] * len(SHAPES)
    largest_is_label = 0
    for _, mask, label in scenes:
        areas = torch.bincount(mask.flatten(), minlength=len(SEGMENTATION_CLASSES))[1:]
        assert areas[label] > 0  # the main object is drawn last: it is always visible
        largest_is_label += int(areas.argmax() == label)
    assert largest_is_label / N > 0.8  # other shapes may be as large (a bar is thin) but rarely are


def test_scenes_hold_several_objects_of_every_class(scenes):
    objects_per_scene = [len(mask.unique()) - 1 for _, mask, _ in scenes]
    assert min(objects_per_scene) >= 1 and np.mean(objects_per_scene) >= 2  # distinct classes visible
    pixels = torch.stack([mask for _, mask, _ in scenes]).flatten()
    counts = torch.bincount(pixels, minlength=len(SEGMENTATION_CLASSES))[1:].float()
    assert counts.min() > 0.25 * counts.max(), counts  # every shape class is a real share of the pixels


def test_the_patch_grid_is_six_by_six_and_a_typical_object_spans_two_by_two_patches(scenes):
    patch = 8
    image = scenes[0][0]
    assert image.shape[-1] // patch >= 6  # the default size at the builtin preset's patch size
    areas = [int((mask == c).sum()) for _, mask, _ in scenes for c in mask.unique().tolist() if c]
    assert np.median(areas) >= 4 * patch * patch, np.median(areas)


def test_no_pixel_statistic_gives_the_class_away(scenes):
    """Brightness, contrast to the background, spread and texture energy of the labelled object's pixels do not
    differ between classes: a one-way analysis of variance (F statistic over the six classes, computed here
    from its definition) stays below the 0.1 % critical value, F(5, 234) = 4.3. Colour or texture tied to the
    class fails it."""
    rows = []
    for image, mask, label in scenes:
        pixels, inside = image.float().mean(0), mask == label + 1
        energy = (pixels.diff(dim=1).abs()[inside[:, 1:] & inside[:, :-1]]).mean()
        mean = pixels[inside].mean()
        rows.append((mean, mean - pixels[mask == 0].mean(), pixels[inside].std(), energy))
    features, labels = torch.tensor(rows, dtype=torch.float64), torch.tensor([label for *_, label in scenes])
    groups = [features[labels == c] for c in range(len(SHAPES))]
    grand = features.mean(0)
    between = sum(len(g) * (g.mean(0) - grand) ** 2 for g in groups) / (len(groups) - 1)
    within = sum(((g - g.mean(0)) ** 2).sum(0) for g in groups) / (len(features) - len(groups))
    f_statistic = between / within
    assert (f_statistic < 4.3).all(), f_statistic
