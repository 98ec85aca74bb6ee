"""The linear segmentation probe (``adclr.eval_seg``): its metric, that it learns, folder = built-in, bad input."""

import json
import os

import numpy as np
import pytest
import torch
from eval_utils import SIZE, random_vit, save_png, write_colour_segmentation, write_export
from PIL import Image

from adclr.data import SegmentationFolder, SyntheticScenes, write_scenes
from adclr.evaluation.features import as_frozen
from adclr.evaluation.seg import confusion_matrix, iou_from_confusion, main, seg_probe, seg_transform

CPU = torch.device("cpu")


def test_confusion_and_iou_match_a_pixel_loop():
    num_classes = 5
    target = torch.randint(0, num_classes, (3, 9, 7))
    target[torch.rand(target.shape) < 0.2] = 255
    target[target == 3] = 2  # class 3 never in the ground truth ...
    prediction = torch.randint(0, num_classes, (3, 9, 7))
    prediction[prediction == 4] = 0  # ... class 4 never anywhere
    target[target == 4] = 0
    reference = np.zeros((num_classes, num_classes), np.int64)
    for t, p in zip(target.flatten().tolist(), prediction.flatten().tolist()):
        if t != 255:
            reference[t, p] += 1
    confusion = confusion_matrix(prediction, target, num_classes)
    assert np.array_equal(confusion.numpy(), reference)
    metrics = iou_from_confusion(confusion)
    ious = []
    for c in range(num_classes):
        hit = ((prediction == c) & (target == c)).sum().item()
        union = (((prediction == c) | (target == c)) & (target != 255)).sum().item()
        ious.append(100 * hit / union if union else None)
    assert ious[4] is None and ious[3] == 0.0  # predicted but absent counts as 0; absent everywhere is left out
    assert metrics["per_class_iou"] == pytest.approx(ious)
    assert metrics["miou"] == pytest.approx(np.mean([v for v in ious if v is not None]))
    assert metrics["pixel_accuracy"] == pytest.approx(100 * np.trace(reference) / reference.sum())


def _majority_miou(root) -> float:
    """mIoU of predicting the most frequent val class everywhere."""
    counts = np.zeros(256, np.int64)
    for name in os.listdir(root / "masks"):
        counts += np.bincount(np.asarray(Image.open(root / "masks" / name)).ravel(), minlength=256)
    counts = counts[:255]
    present = (counts > 0).sum()
    return 100 * counts.max() / counts.sum() / present


def test_seg_probe_beats_the_majority_class(tmp_path, capsys):
    write_colour_segmentation(tmp_path / "data" / "train", 24, seed=0)
    write_colour_segmentation(tmp_path / "data" / "val", 8, seed=1)
    weights = write_export(random_vit(), tmp_path / "backbone.safetensors")
    argv = ["--weights", weights, "--data_path", str(tmp_path / "data"), "--image_size", str(SIZE), "--epochs", "8"]
    main(argv + ["--lr", "0.05", "--batch_size_per_gpu", "8", "--num_workers", "0", "--output_dir", str(tmp_path)])
    [line] = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("linear segmentation probe on 8 val images (3 classes): mIoU")
    report = json.loads((tmp_path / "eval_seg.json").read_text())
    baseline = _majority_miou(tmp_path / "data" / "val")
    assert report["miou"] > baseline + 25, (report, baseline)
    assert len(report["per_class_iou"]) == 3 and min(report["per_class_iou"]) > 0


def test_val_is_scored_at_each_masks_own_size(tmp_path):
    """Val images of other sizes than the probe's input: every non-ignored mask pixel is scored once."""
    write_colour_segmentation(tmp_path / "train", 6, seed=0)
    sizes = [(40, 24), (17, 50)]
    total = 0
    for i, (h, w) in enumerate(sizes):
        mask = np.random.default_rng(i).integers(0, 3, (h, w)).astype(np.uint8)
        mask[0, 0] = 255
        total += int((mask != 255).sum())
        save_png(mask, str(tmp_path / "val" / "masks" / f"{i}.png"))
        save_png(np.full((h, w, 3), 128, np.uint8), str(tmp_path / "val" / "images" / f"{i}.png"))
    result = seg_probe(
        as_frozen(random_vit()),
        SegmentationFolder(str(tmp_path / "train"), seg_transform(SIZE, resize_mask=True)),
        SegmentationFolder(str(tmp_path / "val"), seg_transform(SIZE)),
        epochs=1,
        device=CPU,
    )
    assert result["pixels"] == total and result["num_classes"] == 3


def test_seg_probe_on_written_folders_equals_the_built_in_data(tmp_path):
    write_scenes(str(tmp_path), train_size=24, val_size=12, size=SIZE, seed=2)
    backbone = as_frozen(random_vit())
    settings = dict(num_classes=7, epochs=2, batch_size=8, device=CPU, seed=4)
    train_t, val_t = seg_transform(SIZE, resize_mask=True), seg_transform(SIZE)
    from_folders = seg_probe(
        backbone,
        SegmentationFolder(str(tmp_path / "segmentation" / "train"), train_t),
        SegmentationFolder(str(tmp_path / "segmentation" / "val"), val_t),
        **settings,
    )
    in_memory = seg_probe(
        backbone,
        SyntheticScenes(24, SIZE, "train", 2, train_t, target="mask"),
        SyntheticScenes(12, SIZE, "test", 2, val_t, target="mask"),
        **settings,
    )
    assert from_folders == in_memory


# ---- bad input --------------------------------------------------------------------------------------


def _break(root, case):
    """Write good train/ and val/ folders under ``root``, then break them as ``case`` says; returns the message."""
    write_colour_segmentation(root / "train", 4, seed=0)
    write_colour_segmentation(root / "val", 2, seed=1)
    val = root / "val"
    if case == "mask size differs":
        save_png(np.zeros((SIZE, SIZE + 1), np.uint8), str(val / "masks" / "001.png"))
        return "is 33x32 but its image is 32x32"
    if case == "image without mask":
        (val / "masks" / "001.png").unlink()
        return "images without a mask: ['001'], masks without an image: none"
    if case == "mask without image":
        (val / "images" / "001.png").unlink()
        return "images without a mask: none, masks without an image: ['001']"
    if case == "colour mask":
        save_png(np.zeros((SIZE, SIZE, 3), np.uint8), str(val / "masks" / "001.png"))
        return "has mode RGB; a mask must be a single-channel PNG"
    if case == "no masks folder":
        for f in (val / "masks").iterdir():
            f.unlink()
        (val / "masks").rmdir()
        return "masks' is not a folder"
    if case == "no images":
        for folder in ("images", "masks"):
            for f in (val / folder).iterdir():
                f.unlink()
        return "no images with extensions"
    if case == "val class unknown to train":
        mask = np.asarray(Image.open(val / "masks" / "000.png")).copy()
        mask[5, 5] = 7
        save_png(mask, str(val / "masks" / "000.png"))
        return "a val mask has class 7 but the probe has 3 classes"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "mask size differs",
        "image without mask",
        "mask without image",
        "colour mask",
        "no masks folder",
        "no images",
        "val class unknown to train",
    ],
)
def test_bad_input_is_refused_with_one_line(tmp_path, capsys, case):
    message = _break(tmp_path / "data", case)
    weights = write_export(random_vit(), tmp_path / "backbone.safetensors")
    with pytest.raises(SystemExit) as stop:
        main(
            ["--weights", weights, "--data_path", str(tmp_path / "data"), "--image_size", str(SIZE), "--epochs", "1"]
            + ["--num_workers", "0", "--output_dir", str(tmp_path / "out")]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("adclr.eval_seg: error: "), err
    assert message in err[0], err
    assert not (tmp_path / "out" / "eval_seg.json").exists()


def test_image_size_must_be_a_multiple_of_the_patch(tmp_path, capsys):
    write_colour_segmentation(tmp_path / "data" / "train", 2, seed=0)
    write_colour_segmentation(tmp_path / "data" / "val", 1, seed=1)
    weights = write_export(random_vit(), tmp_path / "backbone.safetensors")
    with pytest.raises(SystemExit):
        main(["--weights", weights, "--data_path", str(tmp_path / "data"), "--image_size", "36", "--num_workers", "0"])
    assert "--image_size 36 must be a multiple of the backbone's patch size 8, e.g. 32 or 40" in capsys.readouterr().err
