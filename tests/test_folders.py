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
