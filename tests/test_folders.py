"""Image folders with symbolic links: each real folder is visited once and each real image counts once."""

import os

import numpy as np
import pytest
from PIL import Image

from adclr.data import ImageFiles, LabelledImages


def _png(path, value):
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def test_a_link_to_the_parent_counts_each_image_once(tmp_path):
    """The issue's folder: 16 images and a link to its own parent. The link holds no class of its own (it
    leads back above the folder), so this stays a flat folder of 16 images."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(16):
        _png(data / f"{i:02d}.png", i)
    os.symlink(tmp_path, data / "up")
    dataset = ImageFiles(str(data))
    assert dataset.classes == []
    assert dataset.samples == [(str(data / f"{i:02d}.png"), -1) for i in range(16)]
    (data / "real_class").mkdir()  # with a real class folder beside it, the link is still no class
    _png(data / "real_class" / "x.png", 0)
    dataset = ImageFiles(str(data))
    assert dataset.classes == ["real_class"] and dataset.samples == [(str(data / "real_class" / "x.png"), 0)]


@pytest.mark.parametrize("dataset_class", [ImageFiles, LabelledImages])
def test_loops_and_second_links_are_passed_over(tmp_path, dataset_class):
    root = tmp_path / "tree"
    cats, dogs = root / "cats", root / "dogs"
    (cats / "sub").mkdir(parents=True)
    dogs.mkdir()
    for name in ("a", "b"):
        _png(cats / f"{name}.png", 10)
    _png(cats / "sub" / "c.png", 20)
    _png(dogs / "d.png", 30)
    os.symlink(root, cats / "sub" / "to_root")  # a loop through the root
    os.symlink(cats, cats / "sub" / "to_cats")  # a loop through the class folder
    os.symlink(cats / "a.png", dogs / "a_again.png")  # one file twice
    os.symlink(cats / "sub", dogs / "sub_again")  # one folder twice
    os.symlink(tmp_path / "nowhere.png", dogs / "dangling.png")
    dataset = dataset_class(str(root))
    assert dataset.classes == ["cats", "dogs"]
    expected = [(cats / "a.png", 0), (cats / "b.png", 0), (cats / "sub" / "c.png", 0), (dogs / "d.png", 1)]
    assert dataset.samples == [(str(path), label) for path, label in expected]


def test_a_class_that_is_only_a_link_to_another_class_has_no_images(tmp_path):
    root = tmp_path / "tree"
    (root / "cats").mkdir(parents=True)
    _png(root / "cats" / "a.png", 1)
    os.symlink(root / "cats", root / "kittens")
    assert [label for _, label in ImageFiles(str(root)).samples] == [0]
    with pytest.raises(ValueError, match="Found no valid file for the classes kittens"):
        LabelledImages(str(root))


def test_a_16_bit_png_loads_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    """PIL's convert("RGB") clips 16-bit values above 255: the image would be almost all white."""
    levels = np.arange(0, 256, 4, dtype=np.uint16).reshape(8, 8)  # the 8-bit levels the image should show
    (tmp_path / "flat").mkdir()
    Image.fromarray(levels * 257).save(tmp_path / "flat" / "deep.png")  # 16-bit PNG: level * 257 in [0, 65535]
    with Image.open(tmp_path / "flat" / "deep.png") as written:
        assert written.mode.startswith("I")  # really a 16-bit file
    image, _ = ImageFiles(str(tmp_path / "flat"))[0]
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.repeat(levels[:, :, None], 3, axis=2))
    (tmp_path / "tree" / "grey").mkdir(parents=True)
    Image.fromarray(levels * 257 + 100).save(tmp_path / "tree" / "grey" / "deep.png")  # rounds to the same levels
    image, _ = LabelledImages(str(tmp_path / "tree"))[0]
    assert np.array_equal(np.asarray(image)[:, :, 0], levels)


def test_a_segmentation_folder_is_not_taken_for_two_classes(tmp_path, capsys):
    """eval_knn (and train.py --eval_data_path) given images/ + masks/ splits: one error line, not 98.5 %."""
    from eval_utils import random_vit, write_colour_segmentation, write_export

    from adclr.cli import require_eval_folders
    from adclr.errors import UserError
    from adclr.eval_knn import main

    for split, seed in (("train", 0), ("val", 1)):
        write_colour_segmentation(tmp_path / "seg" / split, 2, seed=seed)
    weights = write_export(random_vit(), tmp_path / "backbone.safetensors")
    with pytest.raises(SystemExit) as caught:
        main(
            [
                "--weights",
                weights,
                "--data_path",
                str(tmp_path / "seg"),
                "--num_workers",
                "0",
                "--output_dir",
                str(tmp_path),
            ]
        )
    assert caught.value.code == 2
    assert capsys.readouterr().err == (
        f"adclr.eval_knn: error: the folder {tmp_path / 'seg' / 'train'} holds images/ and masks/, a segmentation "
        "folder (python -m adclr.eval_seg reads it); k-NN and the linear probe need ImageFolder trees, one "
        "sub-folder of images per class\n"
    )
    with pytest.raises(UserError, match=rf"^--eval_data_path {tmp_path / 'seg' / 'train'} holds images/ and masks/"):
        require_eval_folders(str(tmp_path / "seg"), "--eval_data_path")
