"""The evaluation protocols on features chosen by hand: what each computes, whatever backbone feeds it.

A stand-in backbone returns its input as the features, so each case fixes them exactly: the k-NN's
cosine similarity (L2 normalisation of train and test), its vote weights and temperature, top-5; the
linear probe's scoring; the segmentation probe's bilinear upsampling, ignored pixels and mIoU over
all val pixels. Expected values are hand-checked or come from float64 / numpy formulas written here.
The commands are also checked to evaluate a checkpoint's teacher unless told otherwise.
"""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from engine_utils import batch, tiny_config
from eval_utils import save_png, write_colour_classes, write_colour_segmentation
from torch.utils.data import TensorDataset

from adclr import train_step
from adclr.checkpoint import load_backbone, save_checkpoint
from adclr.evaluation import knn as eval_knn
from adclr.evaluation import linear as eval_linear
from adclr.evaluation import seg as eval_seg
from adclr.evaluation.features import BackboneFeatures, load_frozen_backbone
from adclr.evaluation.knn import knn_evaluate, weighted_knn
from adclr.evaluation.linear import LinearClassifier, validate
from adclr.evaluation.seg import score_seg_probe, seg_probe, seg_transform
from adclr.export import load_exported
from adclr.export import main as export_main
from adclr.schedules import StepSettings

CPU = torch.device("cpu")


class Features(nn.Module):
    """A stand-in backbone: its "images" are the features (CLS for the k-NN, patch tokens for the seg probe)."""

    def forward(self, images):
        return SimpleNamespace(cls=images, patches=images)


def knn(train, train_labels, test, test_labels, num_classes, k, temperature=0.07):
    """``knn_evaluate`` on the given raw (unnormalised) features; returns ``{"top1", "top5"}`` for ``k``."""
    as_set = lambda f, y: TensorDataset(torch.tensor(f, dtype=torch.float32), torch.tensor(y))  # noqa: E731
    results = knn_evaluate(
        Features(),
        as_set(train, train_labels),
        as_set(test, test_labels),
        num_classes=num_classes,
        ks=(k,),
        temperature=temperature,
        batch_size=2,
        device=CPU,
    )
    return results[k]


# ---- k-NN ---------------------------------------------------------------------------------------------


def test_knn_ranks_by_cosine_not_by_dot_product():
    """Train features of very different norms: the nearest by cosine is the short one (class 0), the
    largest dot product the long one (class 1). Without L2-normalised train features, class 1 wins."""
    train, labels = [[1.0, 0.0], [5.0, 10.0]], [0, 1]  # cosines with the test row: 0.98 and 0.61
    test = [[3.0, 0.6]]  # dot products: 3 and 21
    assert knn(train, labels, test, [0], num_classes=2, k=1)["top1"] == 100.0


def test_knn_vote_weights_use_the_cosine_of_a_normalised_test_row():
    """One class-1 neighbour at cosine 0.9 against two class-0 ones at 0.5: with T = 0.07 class 1 wins
    (exp(0.9 / T) = 3.8e5 > 2 exp(0.5 / T) = 2.5e3). A test row of norm 0.01 left unnormalised would
    give 2 exp(0.005 / T) = 2.15 > exp(0.009 / T) = 1.14: class 0."""
    train = [[0.9, math.sqrt(1 - 0.81), 0.0], [0.5, 0.0, math.sqrt(0.75)], [0.5, 0.0, -math.sqrt(0.75)]]
    labels = [1, 0, 0]
    assert knn(train, labels, [[0.01, 0.0, 0.0]], [1], num_classes=2, k=3)["top1"] == 100.0
    assert knn(train, labels, [[100.0, 0.0, 0.0]], [1], num_classes=2, k=3)["top1"] == 100.0


@pytest.mark.parametrize(
    "temperature, winner",
    [(0.07, 1), (1.0, 0)],  # T = 1: exp(0.9) = 2.46 < 2 exp(0.5) = 3.30
)
def test_knn_temperature_decides_between_one_close_and_two_far_neighbours(temperature, winner):
    train = [[0.9, math.sqrt(1 - 0.81), 0.0], [0.5, 0.0, math.sqrt(0.75)], [0.5, 0.0, -math.sqrt(0.75)]]
    labels = [1, 0, 0]
    test = [[1.0, 0.0, 0.0]]
    assert knn(train, labels, test, [winner], num_classes=2, k=3, temperature=temperature)["top1"] == 100.0
    result = weighted_knn(
        torch.tensor(train), torch.tensor(labels), torch.tensor(test), torch.tensor([winner]), 2, (3,), temperature
    )
    assert result[3]["top1"] == 100.0


def test_knn_top5_is_the_five_classes_with_most_votes():
    """8 classes; six unit train rows of classes 0-5 at decreasing cosine. k = 6: the target of rank 5 is a
    top-5 hit, rank 6 is not, a class without a vote is not. k = 1: only class 0 has a vote, so the
    classes tied at zero never count, though ``topk`` returns four of them."""
    cosines = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    train = [[c, math.sqrt(1 - c * c) * math.cos(i), math.sqrt(1 - c * c) * math.sin(i)] for i, c in enumerate(cosines)]
    test = [[2.0, 0.0, 0.0]] * 4
    result = knn(train, list(range(6)), test, [0, 4, 5, 7], num_classes=8, k=6)
    assert result == {"top1": 25.0, "top5": 50.0}
    result = knn(train, list(range(6)), [[1.0, 0.0, 0.0]] * 5, [1, 2, 3, 4, 5], num_classes=6, k=1)
    assert result == {"top1": 0.0, "top5": 0.0}


def cosine_brute_force(train, train_labels, test, test_labels, num_classes, k, temperature):
    """top-1 / top-5 (%) in float64: cosine = dot / (|a| |b|), the k most similar vote exp(cosine / T)."""
    train, test = np.asarray(train, np.float64), np.asarray(test, np.float64)
    cosine = (test @ train.T) / np.outer(np.linalg.norm(test, axis=1), np.linalg.norm(train, axis=1))
    top1 = top5 = 0
    for row, target in zip(cosine, test_labels):
        votes = np.zeros(num_classes)
        for j in np.argsort(-row)[:k]:
            votes[train_labels[j]] += math.exp(row[j] / temperature)
        top1 += int(np.argmax(votes) == target)
        top5 += int(votes[target] > 0 and (votes > votes[target]).sum() < 5)
    return 100 * top1 / len(test), 100 * top5 / len(test)


@pytest.mark.parametrize("temperature", [0.07, 0.3])
def test_knn_evaluate_on_features_of_any_norm_matches_a_cosine_brute_force(temperature):
    """Class-dependent directions plus noise, each row scaled by a norm between 0.01 and 100."""
    num_classes, dim = 9, 6
    centres = torch.randn(num_classes, dim)
    train_y, test_y = torch.randint(0, num_classes, (60,)), torch.randint(0, num_classes, (25,))
    scale = lambda n: 10 ** (4 * torch.rand(n, 1) - 2)  # noqa: E731
    train = (centres[train_y] + 0.8 * torch.randn(60, dim)) * scale(60)
    test = (centres[test_y] + 0.8 * torch.randn(25, dim)) * scale(25)
    for k in (1, 4, 15, 100):
        got = knn(train.tolist(), train_y.tolist(), test.tolist(), test_y.tolist(), num_classes, k, temperature)
        expected = cosine_brute_force(
            train, train_y.tolist(), test, test_y.tolist(), num_classes, min(k, 60), temperature
        )
        assert (got["top1"], got["top5"]) == pytest.approx(expected), k
    assert 0 < got["top1"] < got["top5"] < 100  # not a degenerate case


# ---- linear probe -------------------------------------------------------------------------------------


class BlockFeatures(nn.Module):
    """A stand-in backbone whose "images" hold ``depth`` CLS tokens (one per block) then two patch tokens,
    each ``dim`` wide, flattened."""

    def __init__(self, depth, dim):
        super().__init__()
        self.depth, self.embed_dim = depth, dim

    def forward(self, images, n_last_blocks=1):
        tokens = images.unflatten(1, (-1, self.embed_dim))
        cls_blocks = tokens[:, self.depth - n_last_blocks : self.depth]
        return BackboneFeatures(
            cls=cls_blocks[:, -1], cls_blocks=cls_blocks, patches=tokens[:, self.depth :], grid=(1, 2)
        )


@pytest.mark.parametrize("n_last_blocks, avgpool", [(2, True), (3, False), (1, True)])
def test_linear_probe_scores_dino_features_over_ragged_batches(n_last_blocks, avgpool):
    """Top-1, top-5 and the mean loss over 11 val images in batches of 4, from logits computed here: the
    CLS tokens of the last ``n_last_blocks`` blocks, oldest first, then the mean of the patch tokens."""
    depth, dim, num_classes, count = 3, 4, 7, 11
    tokens = torch.randn(count, depth + 2, dim)
    labels = torch.randint(0, num_classes, (count,))
    classifier = LinearClassifier(dim * (n_last_blocks + int(avgpool)), num_classes)
    with torch.no_grad():
        classifier.linear.weight.normal_()
        classifier.linear.bias.normal_()
    stats = validate(
        BlockFeatures(depth, dim),
        classifier,
        TensorDataset(tokens.flatten(1), labels),
        n_last_blocks=n_last_blocks,
        avgpool=avgpool,
        batch_size=4,
        device=CPU,
    )
    t = tokens.double().numpy()
    w, b = (p.detach().double().numpy() for p in (classifier.linear.weight, classifier.linear.bias))
    top1 = top5 = loss = 0.0
    for i, target in enumerate(labels.tolist()):
        parts = [t[i, block] for block in range(depth - n_last_blocks, depth)]
        if avgpool:
            parts.append(t[i, depth:].mean(0))
        logits = w @ np.concatenate(parts) + b
        rank = int((logits > logits[target]).sum())
        top1, top5 = top1 + (rank == 0), top5 + (rank < 5)
        loss += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[target]
    assert stats["top1"] == pytest.approx(100 * top1 / count)
    assert stats["top5"] == pytest.approx(100 * top5 / count)
    assert stats["loss"] == pytest.approx(loss / count, rel=1e-5)


# ---- segmentation probe ---------------------------------------------------------------------------------


def bilinear(grid_logits, height, width):
    """``[K, h, w]`` -> ``[K, height, width]`` in float64: half-pixel centres, edges clamped (align_corners=False)."""

    def taps(out, size):
        src = np.clip((np.arange(out) + 0.5) * size / out - 0.5, 0, size - 1)
        low = np.floor(src).astype(int)
        return low, np.minimum(low + 1, size - 1), src - low

    (y0, y1, fy), (x0, x1, fx) = taps(height, grid_logits.shape[1]), taps(width, grid_logits.shape[2])
    g = grid_logits.astype(np.float64)
    top = g[:, y0][:, :, x0] * (1 - fx) + g[:, y0][:, :, x1] * fx
    bottom = g[:, y1][:, :, x0] * (1 - fx) + g[:, y1][:, :, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def test_seg_scoring_upsamples_bilinearly_and_pools_every_val_pixel():
    """Logits on a 2 x 3 patch grid, masks of three other sizes (255 = ignore, scored by no class), batches of
    2: per-class IoU from pixel counts over all images (not a mean of per-image mIoUs), mIoU over the
    classes present in ground truth or prediction."""
    num_classes, grid = 4, (2, 3)
    sizes = [(12, 20), (7, 9), (16, 16)]
    logits = torch.randn(len(sizes), grid[0] * grid[1], num_classes)  # patch tokens; the head is the identity
    masks = []
    for h, w in sizes:
        mask = torch.randint(0, num_classes - 1, (h, w), dtype=torch.uint8)  # class 3 never in the ground truth
        mask[torch.rand(h, w) < 0.15] = 255
        masks.append(mask)
    head = nn.Linear(num_classes, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.eye(num_classes))
        head.bias.zero_()
    val = [(logits[i], masks[i]) for i in range(len(sizes))]
    metrics = score_seg_probe(Features(), head, val, num_classes, grid, CPU, batch_size=2)

    hits, union = np.zeros(num_classes), np.zeros(num_classes)
    pixels = 0
    for tokens, mask in zip(logits.numpy(), masks):
        grid_logits = tokens.T.reshape(num_classes, *grid)  # token r * 3 + c is patch (r, c)
        prediction = bilinear(grid_logits, *mask.shape).argmax(0)
        target = mask.numpy().astype(int)
        valid = target != 255
        pixels += valid.sum()
        for c in range(num_classes):
            hits[c] += (valid & (prediction == c) & (target == c)).sum()
            union[c] += (valid & ((prediction == c) | (target == c))).sum()
    present = union > 0
    iou = 100 * hits / np.where(present, union, 1)
    assert metrics["pixels"] == pixels
    assert metrics["per_class_iou"] == pytest.approx([v if p else None for v, p in zip(iou, present)])
    assert metrics["miou"] == pytest.approx(iou[present].mean())
    assert metrics["pixel_accuracy"] == pytest.approx(100 * hits.sum() / pixels)


def test_seg_train_masks_are_resized_nearest_at_pixel_centres():
    """10 x 13 -> 8 x 8: output pixel i takes input pixel floor((i + 0.5) x in / out), no blending of labels."""
    mask = torch.randint(0, 5, (10, 13))
    mask[0, :3] = 255
    _, resized = seg_transform(8, resize_mask=True)(torch.zeros(3, 10, 13, dtype=torch.uint8), mask)
    rows, cols = (
        np.floor((np.arange(8) + 0.5) * 10 / 8).astype(int),
        np.floor((np.arange(8) + 0.5) * 13 / 8).astype(int),
    )
    assert resized.dtype == torch.uint8
    assert np.array_equal(resized.numpy(), mask.numpy()[rows][:, cols])


class ColourPatches(nn.Module):
    """A stand-in backbone: each 4 x 4 patch's token is its mean colour (a linear probe can read the class off it)."""

    patch_size, embed_dim = 4, 3

    def forward(self, images):
        return SimpleNamespace(patches=nn.functional.avg_pool2d(images, 4).flatten(2).transpose(1, 2))


def _patch_image(colours, labels):
    """An 8 x 8 image of 2 x 2 patches with the given colours and a mask with the given labels."""
    image = torch.tensor(colours, dtype=torch.float32).view(2, 2, 3).permute(2, 0, 1)
    mask = torch.tensor(labels, dtype=torch.uint8).view(2, 2)
    return image.repeat_interleave(4, 1).repeat_interleave(4, 2), mask.repeat_interleave(4, 0).repeat_interleave(4, 1)


RED, GREEN, BLUE = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]


def test_seg_probe_learns_nothing_from_ignored_pixels():
    """Blue patches are class 2 in 4 train images and ignored (255) in 16 others, where red and green are
    classes 0 and 1. Trained on the ignored pixels as any class, blue would be predicted as that class."""
    train = [_patch_image([BLUE, RED, RED, GREEN], [255, 0, 0, 1]) for _ in range(16)]
    train += [_patch_image([RED, BLUE, GREEN, RED], [0, 2, 1, 0]) for _ in range(4)]
    val = [_patch_image([BLUE, GREEN, RED, RED], [2, 1, 0, 0]), _patch_image([RED, RED, RED, BLUE], [0, 0, 0, 2])]
    result = seg_probe(ColourPatches(), train, val, num_classes=3, epochs=30, lr=0.1, batch_size=5, device=CPU)
    assert result["per_class_iou"][2] > 50, result


# ---- which network the commands evaluate --------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A train.py checkpoint whose teacher and student differ clearly."""
    path = str(tmp_path_factory.mktemp("run") / "checkpoint.pth")
    config = tiny_config()
    state = train_step.build_train_state(config, CPU)
    train_step.training_step(state, *batch(config), StepSettings(0.01, 0.04, 0.04, 0.9, False))
    with torch.no_grad():
        for p in state.teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_checkpoint(path, state, config, epoch=1, history=[])
    return path


def _same_network(cls, checkpoint, branch) -> bool:
    """Whether ``cls(images)``, a CLS feature, is the checkpoint's ``branch`` network's."""
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return torch.allclose(cls(images), load_backbone(checkpoint, branch)[0](images).cls, atol=1e-5)


def _stub_results(module):
    """What each command's protocol function returns, without running it."""
    if module is eval_knn:
        return lambda *args, ks, **kwargs: {k: {"top1": 0.0, "top5": None} for k in ks}
    if module is eval_linear:
        record = {"epoch": 1, "top1": 0.0, "top5": None, "loss": 0.0}
        return lambda *a, **kw: {**record, "best_top1": 0.0, "best_epoch": 1, "history": [record]}
    return lambda *a, **kw: {"miou": 0.0, "per_class_iou": [0.0], "pixel_accuracy": 0.0, "pixels": 1, "num_classes": 1}


@pytest.mark.parametrize("module", [eval_knn, eval_linear, eval_seg], ids=["knn", "linear", "seg"])
@pytest.mark.parametrize("which", [None, "teacher", "student"])
def test_commands_evaluate_the_teacher_unless_told(module, which, checkpoint, tmp_path, monkeypatch):
    name = {eval_knn: "knn_evaluate", eval_linear: "linear_probe", eval_seg: "seg_probe"}[module]
    used = []
    stub = _stub_results(module)

    def spy(backbone, *args, **kwargs):
        used.append((backbone, kwargs))
        return stub(backbone, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    for split in ("train", "val"):
        if module is eval_seg:
            write_colour_segmentation(tmp_path / "data" / split, 1, seed=0)
        else:
            write_colour_classes(tmp_path / "data" / split, per_class=1, seed=0)
    argv = ["--weights", checkpoint, "--data_path", str(tmp_path / "data"), "--image_size", "32"]
    argv += ["--num_workers", "0", "--output_dir", str(tmp_path / "out")] + (["--which", which] if which else [])
    knn_flags = ["--nb_knn", "3", "7", "--temperature", "0.5"]  # and the k-NN's settings reach the protocol
    module.main(argv + (knn_flags if module is eval_knn else []))
    [(backbone, settings)] = used
    if module is eval_knn:
        assert settings["ks"] == (3, 7) and settings["temperature"] == 0.5
    expected = which or "teacher"
    other = {"teacher": "student", "student": "teacher"}[expected]
    cls = lambda images: backbone(images).cls  # noqa: E731
    assert _same_network(cls, checkpoint, expected) and not _same_network(cls, checkpoint, other)
    [report] = (tmp_path / "out").glob("eval_*.json")
    assert json.loads(report.read_text())["backbone"]["which"] == expected


def test_export_visualize_and_the_python_api_take_the_teacher_by_default(checkpoint, tmp_path, monkeypatch):
    import adclr.visualize

    export_main(["--checkpoint", checkpoint, "--output", str(tmp_path / "default.safetensors")])
    model = load_exported(str(tmp_path / "default.safetensors"))
    exported = lambda images: model.forward_features(images)[:, 0]  # noqa: E731
    assert _same_network(exported, checkpoint, "teacher") and not _same_network(exported, checkpoint, "student")

    shown = []
    monkeypatch.setattr(adclr.visualize, "attention_pictures", lambda backbone, *args: shown.append(backbone) or [])
    save_png(np.full((32, 32, 3), 128, np.uint8), str(tmp_path / "image.png"))
    adclr.visualize.main(["--checkpoint", checkpoint, "--image", str(tmp_path / "image.png")])
    [backbone] = shown
    pictured = lambda images: backbone(images).cls  # noqa: E731
    assert _same_network(pictured, checkpoint, "teacher") and not _same_network(pictured, checkpoint, "student")

    frozen = load_frozen_backbone(checkpoint)
    loaded = lambda images: frozen(images).cls  # noqa: E731
    assert _same_network(loaded, checkpoint, "teacher") and not _same_network(loaded, checkpoint, "student")
