"""The dense probe on the built-in scenes reads what patch features carry: near 100 % mIoU for features that
hold each pixel's class, the predict-background baseline for a constant feature."""

import torch
import torch.nn as nn

from adclr.augment import IMAGENET_MEAN, IMAGENET_STD
from adclr.data import SEGMENTATION_CLASSES, SyntheticScenes
from adclr.evaluation.features import BackboneFeatures
from adclr.evaluation.seg import seg_probe, seg_transform

SIZE, CLASSES = 48, len(SEGMENTATION_CLASSES)
LEVEL = 30  # an encoded scene's pixel value per class index


class EncodedScenes(SyntheticScenes):
    """Scenes whose image is their mask (class c drawn as grey level 30 c): a backbone can read the truth."""

    def generate(self, index):
        _, mask, label = super().generate(index)
        return (mask * LEVEL).to(torch.uint8).expand(3, -1, -1).clone(), mask, label


class OracleBackbone(nn.Module):
    """Per-pixel "patch" features: the one-hot class decoded from an ``EncodedScenes`` image (or a constant)."""

    patch_size, embed_dim = 1, CLASSES

    def __init__(self, constant: bool = False):
        super().__init__()
        self.constant = constant

    def forward(self, images: torch.Tensor) -> BackboneFeatures:
        grey = images[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # undo the probe's normalisation
        classes = (grey * 255 / LEVEL).round().long().clamp(0, CLASSES - 1).flatten(1)
        patches = torch.ones(*classes.shape, CLASSES) if self.constant else nn.functional.one_hot(classes, CLASSES)
        cls = torch.zeros(images.shape[0], CLASSES)
        return BackboneFeatures(cls=cls, cls_blocks=cls[:, None], patches=patches.float(), grid=images.shape[-2:])


def _probe(backbone):
    train = EncodedScenes(48, SIZE, "train", seed=4, transform=seg_transform(SIZE, resize_mask=True), target="mask")
    val = EncodedScenes(24, SIZE, "test", seed=4, transform=seg_transform(SIZE), target="mask")
    return seg_probe(
        backbone, train, val, num_classes=CLASSES, epochs=10, lr=0.05, batch_size=8, device=torch.device("cpu")
    )


def test_features_that_carry_each_pixels_class_score_near_100_percent():
    result = _probe(OracleBackbone())
    assert result["miou"] > 97, result
    assert all(iou is not None and iou > 90 for iou in result["per_class_iou"]), result


def test_a_constant_feature_scores_the_predict_background_baseline():
    result = _probe(OracleBackbone(constant=True))
    masks = torch.stack([SyntheticScenes(24, SIZE, "test", seed=4).generate(i)[1] for i in range(24)])
    present = len(masks.unique())
    background_iou = 100 * (masks == 0).float().mean().item()  # predicted everywhere: IoU = its pixel share
    assert abs(result["miou"] - background_iou / present) < 0.01, (result["miou"], background_iou, present)


def test_pictures_show_image_true_mask_and_prediction_side_by_side(tmp_path):
    """The command's --pictures: one row per val scene; the middle column is the true mask in the palette,
    the right one the oracle's prediction, which matches it."""
    from PIL import Image

    from adclr.evaluation.seg import _palette, seg_pictures, train_seg_head

    head, num_classes, grid, backbone, val_set, _ = train_seg_head(
        OracleBackbone(),
        EncodedScenes(48, SIZE, "train", seed=4, transform=seg_transform(SIZE, resize_mask=True), target="mask"),
        EncodedScenes(3, SIZE, "test", seed=4, transform=seg_transform(SIZE), target="mask"),
        num_classes=CLASSES,
        epochs=10,
        lr=0.05,
        batch_size=8,
        device=torch.device("cpu"),
    )
    picture = seg_pictures(backbone, head, val_set, 3, grid, torch.device("cpu"))
    scale = picture.width // (3 * SIZE)
    assert scale >= 2 and picture.size == (3 * SIZE * scale, 3 * SIZE * scale)
    pixels = torch.from_numpy(__import__("numpy").asarray(picture.resize((3 * SIZE, 3 * SIZE), Image.NEAREST)))
    palette = (_palette(num_classes) * 255).round().to(torch.uint8)
    for row in range(3):
        mask = val_set[row][1].long()
        true_panel = pixels[row * SIZE : (row + 1) * SIZE, SIZE : 2 * SIZE]
        predicted_panel = pixels[row * SIZE : (row + 1) * SIZE, 2 * SIZE :]
        assert torch.equal(true_panel, palette[mask])
        assert (predicted_panel == palette[mask]).all(-1).float().mean() > 0.97


def test_the_command_writes_its_pictures(tmp_path):
    """``eval_seg --pictures 2`` on written scenes: seg_pictures.png beside eval_seg.json (which holds no picture)."""
    import json

    from eval_utils import random_vit, write_export

    from adclr.data import write_scenes
    from adclr.evaluation.seg import main

    write_scenes(str(tmp_path / "scenes"), train_size=6, val_size=3, size=32, seed=1)
    weights = write_export(random_vit(), tmp_path / "backbone.safetensors")
    main(["--weights", weights, "--data_path", str(tmp_path / "scenes" / "segmentation"), "--image_size", "32",
          "--epochs", "1", "--num_workers", "0", "--pictures", "2", "--output_dir", str(tmp_path / "out")])  # fmt: skip
    assert "pictures" not in json.loads((tmp_path / "out" / "eval_seg.json").read_text())
    from PIL import Image

    with Image.open(tmp_path / "out" / "seg_pictures.png") as picture:
        assert picture.width == 3 * picture.height // 2 and picture.height >= 2 * 32
