"""DINO's linear probe (``adclr.eval_linear``): its input, its defaults, that it learns, resume, bad input."""

import json
from types import SimpleNamespace

import pytest
import torch
from eval_utils import SIZE, random_vit, write_colour_classes, write_export

from adclr.evaluation.features import FrozenBackbone
from adclr.evaluation.linear import default_probe_features, main, probe_input


def test_probe_input_is_last_blocks_cls_then_mean_patch():
    features = FrozenBackbone(random_vit())(torch.randn(2, 3, SIZE, SIZE), n_last_blocks=2)
    cls_only = probe_input(features, avgpool=False)
    pooled = probe_input(features, avgpool=True)
    C = features.cls.shape[1]
    assert cls_only.shape == (2, 2 * C) and pooled.shape == (2, 3 * C)
    torch.testing.assert_close(cls_only[:, C:], features.cls)  # the last block's CLS comes last
    torch.testing.assert_close(pooled[:, : 2 * C], cls_only)
    torch.testing.assert_close(pooled[:, 2 * C :], features.patches.mean(1))


@pytest.mark.parametrize(
    "embed_dim,depth,expected",
    [(384, 12, (4, False)), (192, 12, (4, False)), (768, 12, (1, True)), (96, 3, (3, False))],
)
def test_dino_defaults_by_width(embed_dim, depth, expected):
    assert default_probe_features(SimpleNamespace(embed_dim=embed_dim, depth=depth)) == expected


@pytest.fixture
def colour_data(tmp_path):
    write_colour_classes(tmp_path / "data" / "train", per_class=8, seed=0)
    write_colour_classes(tmp_path / "data" / "val", per_class=4, seed=1)
    return tmp_path / "data"


def _argv(tmp_path, data, *extra):
    weights = write_export(random_vit(), tmp_path / "backbone.safetensors")
    return [
        "--weights",
        weights,
        "--data_path",
        str(data),
        "--image_size",
        str(SIZE),
        "--batch_size_per_gpu",
        "8",
        "--num_workers",
        "0",
        "--output_dir",
        str(tmp_path / "out"),
        *extra,
    ]


def test_linear_probe_learns_labels_the_features_carry(tmp_path, colour_data, capsys):
    """Colour decides the class, so even random features carry it: a few epochs must beat chance (33 %) clearly."""
    main(_argv(tmp_path, colour_data, "--epochs", "4", "--lr", "4.0"))
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("linear probe (4 CLS, 4 epochs) on 12 val images: top-1")  # vit_pico: 4 blocks
    report = json.loads((tmp_path / "out" / "eval_linear.json").read_text())
    assert report["n_last_blocks"] == 4 and report["avgpool_patchtokens"] is False and report["top5"] is None
    assert [record["epoch"] for record in report["history"]] == [1, 2, 3, 4]
    assert report["top1"] >= 75, report["history"]
    assert report["best_top1"] == max(record["top1"] for record in report["history"])


def test_linear_probe_resumes_and_refuses_other_settings(tmp_path, colour_data, capsys):
    argv = _argv(tmp_path, colour_data, "--epochs", "2", "--lr", "4.0", "--avgpool_patchtokens", "true")
    main(argv)
    first = json.loads((tmp_path / "out" / "eval_linear.json").read_text())
    assert first["avgpool_patchtokens"] is True
    main(argv)  # the checkpoint says both epochs are done: nothing retrains, the same results come back
    assert "resumed the linear probe" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "eval_linear.json").read_text()) == first
    with pytest.raises(SystemExit) as stop:
        main(_argv(tmp_path, colour_data, "--epochs", "3"))
    assert stop.value.code == 2 and "use another --output_dir" in capsys.readouterr().err
    other = tmp_path / "other.safetensors"
    other.write_bytes((tmp_path / "backbone.safetensors").read_bytes())
    with pytest.raises(SystemExit):  # another backbone: a probe of the first must not be resumed
        main([*argv[:1], str(other), *argv[2:]])
    assert "use another --output_dir" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--n_last_blocks", "5"], "--n_last_blocks must be in [1, 4]"),
        (["--lr", "0"], "--lr must be positive"),
        (["--epochs", "0"], "epochs must be at least 1"),
    ],
)
def test_bad_settings_are_refused(tmp_path, colour_data, capsys, extra, message):
    with pytest.raises(SystemExit) as stop:
        main(_argv(tmp_path, colour_data, *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and message in err[0]


def test_classes_that_differ_are_refused(tmp_path, capsys):
    write_colour_classes(tmp_path / "data" / "train", per_class=1, seed=0)
    write_colour_classes(tmp_path / "data" / "val", per_class=1, seed=1, classes=("blue", "red"))
    with pytest.raises(SystemExit) as stop:
        main(_argv(tmp_path, tmp_path / "data"))
    assert stop.value.code == 2 and "only in train: ['green']" in capsys.readouterr().err
