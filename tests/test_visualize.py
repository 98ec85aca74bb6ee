"""Attention pictures: tiles of at least 224 px, the CLS map and every query token's map overlaid, each query
crop's box drawn where the crop was cut, written with the user's umask."""

import os
import stat

import numpy as np
import pytest
import torch
from engine_utils import tiny_config
from PIL import Image

from adclr import train_step
from adclr.augment import MultiCropAugmentation, MultiCropConfig
from adclr.visualize import BOX_COLOUR, MIN_TILE, attention_pictures, attention_tiles

SIZE, PATCH, Q = 32, 8, 4


@pytest.fixture(scope="module")
def backbone():
    return train_step.random_init_backbone(tiny_config())


def picture(seed: int = 0) -> Image.Image:
    """A random picture (every query crop sees something different)."""
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (SIZE, SIZE, 3), generator=generator, dtype=torch.uint8).numpy())


def expected_boxes(image: Image.Image, seed: int, factor: int) -> list[tuple[int, int, int, int]]:
    """Where the query crops are cut (drawn independently of adclr.visualize): (x0, y0, x1, y1) in tile pixels."""
    torch.manual_seed(seed)
    augment = MultiCropAugmentation(MultiCropConfig(num_query=Q, patch_size=PATCH, local_crops_number=0))
    boxes = augment.query_boxes(image.convert("RGB").resize((SIZE, SIZE)))
    return [(left * factor, top * factor, (left + w) * factor - 1, (top + h) * factor - 1) for top, left, h, w in boxes]


def box_colour_mask(tile: torch.Tensor) -> torch.Tensor:
    colour = torch.tensor(BOX_COLOUR, dtype=torch.float32)[:, None, None] / 255
    return (tile - colour).abs().amax(0) < 1e-6


def test_tiles_are_large_and_show_each_query_box_where_its_crop_was_cut(backbone):
    image = picture()
    torch.manual_seed(11)
    tiles = attention_tiles(backbone, image, SIZE, PATCH, Q)
    factor = MIN_TILE // SIZE  # 7: the 32 px view shown at 224 px
    for tile in [tiles.image, tiles.cls_mean, *tiles.cls_heads, *tiles.queries]:
        assert tile.shape == (3, SIZE * factor, SIZE * factor) and 0 <= tile.min() and tile.max() <= 1
    assert len(tiles.cls_heads) == backbone.blocks[0].attn.num_heads and len(tiles.queries) == Q
    boxes = expected_boxes(image, 11, factor)
    assert tiles.boxes.tolist() == [list(box) for box in boxes]
    for tile, (x0, y0, x1, y1) in zip(tiles.queries, boxes):
        drawn = box_colour_mask(tile)
        # the box's four edges carry the colour, and nothing outside the box does
        assert drawn[y0, x0 : x1 + 1].all() and drawn[y1, x0 : x1 + 1].all()
        assert drawn[y0 : y1 + 1, x0].all() and drawn[y0 : y1 + 1, x1].all()
        inside_box = torch.zeros_like(drawn)
        inside_box[y0 : y1 + 1, x0 : x1 + 1] = True
        assert not (drawn & ~inside_box).any()
    assert not box_colour_mask(tiles.cls_mean).any() and not box_colour_mask(tiles.image).any()


def test_each_query_token_shows_its_own_attention(backbone):
    """Query tokens with different crops attend differently, and each overlay is its token's map (not the CLS
    map, not another query's): the overlays differ outside the boxes."""
    torch.manual_seed(5)
    tiles = attention_tiles(backbone, picture(1), SIZE, PATCH, Q)
    no_box = ~torch.stack([box_colour_mask(t) for t in tiles.queries]).any(0)
    maps = [t[:, no_box] for t in [tiles.cls_mean, *tiles.queries]]
    for i in range(len(maps)):
        for j in range(i + 1, len(maps)):
            assert not torch.allclose(maps[i], maps[j], atol=1e-3), (i, j)
    heads = [t[:, no_box] for t in tiles.cls_heads]
    assert not torch.allclose(heads[0], heads[1], atol=1e-3)
    # the upscaled image is the view (a bicubic upscale of it), not something else
    small = torch.nn.functional.avg_pool2d(tiles.image[None], MIN_TILE // SIZE)[0]
    view = torch.from_numpy(np.array(picture(1))).permute(2, 0, 1).float() / 255
    assert (small - view).abs().mean() < 0.15  # measured 0.08; a view shifted by one pixel gives 0.33


@pytest.mark.parametrize("size, shown", [(32, 224), (48, 240), (224, 224), (256, 256)])
def test_every_tile_is_at_least_224_px(size, shown):
    config = tiny_config(global_size=size, local_crops_number=0)
    tiles = attention_tiles(train_step.random_init_backbone(config), picture().resize((size, size)), size, PATCH, 1)
    assert tiles.image.shape[-1] == shown and tiles.queries[0].shape[-1] == shown


def test_pictures_are_written_with_the_users_umask(backbone, tmp_path):
    old = os.umask(0o022)
    try:
        paths = attention_pictures(backbone, picture(), SIZE, PATCH, Q, str(tmp_path / "pics"))
    finally:
        os.umask(old)
    assert [os.path.basename(p) for p in paths] == ["cls_attention.png", "query_attention.png"]
    heads = backbone.blocks[0].attn.num_heads
    with Image.open(paths[0]) as cls_png, Image.open(paths[1]) as query_png:
        assert cls_png.size == ((2 + heads) * (MIN_TILE + 2) + 2, MIN_TILE + 4)  # image, mean, heads; 2 px padding
        assert query_png.size == (4 * (MIN_TILE + 2) + 2, 2 * (MIN_TILE + 2) + 2)  # boxes + Q maps, 4 a row
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o644 for p in paths)
    assert sorted(os.listdir(tmp_path / "pics")) == ["cls_attention.png", "query_attention.png"]
    assert attention_pictures(backbone, picture(), SIZE, PATCH, 0, str(tmp_path / "none"))[0].endswith(
        "cls_attention.png"
    )
