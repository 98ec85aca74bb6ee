"""Weighted k-NN (``adclr.eval_knn``): against a brute force, across chunkings and processes, and its command."""

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from eval_utils import SIZE, random_vit, write_colour_classes, write_export

from adclr.data import LabelledImages, SyntheticScenes, write_scenes
from adclr.distributed import DistInfo
from adclr.evaluation.features import as_frozen, eval_transform, extract_features
from adclr.evaluation.knn import knn_evaluate, knn_votes, main, weighted_knn

CPU = torch.device("cpu")


def brute_force_votes(train_f, train_y, test_f, num_classes, k, temperature):
    """Double loop in float64: sort every train row by cosine similarity, the k first vote exp(sim / T)."""
    train_f, test_f = train_f.double().numpy(), test_f.double().numpy()
    votes = np.zeros((len(test_f), num_classes))
    for i, query in enumerate(test_f):
        similarities = [float(np.dot(query, row)) for row in train_f]
        for j in sorted(range(len(train_f)), key=lambda j: -similarities[j])[:k]:
            votes[i, int(train_y[j])] += math.exp(similarities[j] / temperature)
    return votes


def random_features(n_train, n_test, dim, num_classes, signal=0.0):
    centres = torch.randn(num_classes, dim)
    train_y, test_y = torch.randint(0, num_classes, (n_train,)), torch.randint(0, num_classes, (n_test,))
    train_f = F.normalize(torch.randn(n_train, dim) + signal * centres[train_y], dim=1)
    test_f = F.normalize(torch.randn(n_test, dim) + signal * centres[test_y], dim=1)
    return train_f, train_y, test_f, test_y


@pytest.mark.parametrize("train_chunk", [1, 7, 53, 1000])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_knn_votes_match_brute_force(train_chunk, temperature):
    num_classes = 7
    train_f, train_y, test_f, _ = random_features(53, 17, 12, num_classes)
    ks = (1, 5, 20, 200)  # 200 > 53 train rows: the whole train set votes
    votes = knn_votes(train_f, train_y, test_f, num_classes, ks, temperature, train_chunk)
    for k in ks:
        reference = brute_force_votes(train_f, train_y, test_f, num_classes, min(k, 53), temperature)
        torch.testing.assert_close(votes[min(k, 53)].double(), torch.from_numpy(reference), rtol=1e-4, atol=0)


@pytest.mark.parametrize("test_chunk,train_chunk", [(5, 9), (37, 80), (1000, 3)])
def test_weighted_knn_accuracy_matches_brute_force(test_chunk, train_chunk):
    num_classes, temperature, ks = 10, 0.07, (1, 3, 10, 200)
    train_f, train_y, test_f, test_y = random_features(80, 37, 16, num_classes, signal=0.6)
    results = weighted_knn(train_f, train_y, test_f, test_y, num_classes, ks, temperature, test_chunk, train_chunk)
    for k in ks:
        votes = brute_force_votes(train_f, train_y, test_f, num_classes, min(k, 80), temperature)
        top1 = top5 = 0
        for v, target in zip(votes, test_y.tolist()):
            top1 += int(np.argmax(v) == target)
            better = int((v > v[target]).sum())  # classes ranked above the target
            top5 += int(v[target] > 0 and better < 5)
        assert results[k]["top1"] == pytest.approx(100 * top1 / 37)
        assert results[k]["top5"] == pytest.approx(100 * top5 / 37)
    assert 0 < results[10]["top1"] < 100 and results[10]["top1"] < results[10]["top5"]  # not a degenerate case


def test_top5_is_not_reported_for_five_classes_or_fewer():
    train_f, train_y, test_f, test_y = random_features(30, 10, 8, 5)
    assert weighted_knn(train_f, train_y, test_f, test_y, 5, ks=(3,))[3]["top5"] is None


def test_knn_on_written_folders_equals_the_built_in_data(tmp_path):
    write_scenes(str(tmp_path), train_size=36, val_size=18, size=SIZE, seed=3)
    transform = eval_transform(SIZE, SIZE)
    train = LabelledImages(str(tmp_path / "classification" / "train"), transform)
    val = LabelledImages(str(tmp_path / "classification" / "val"), transform)
    assert train.classes == ["0_disk", "1_square", "2_triangle", "3_cross", "4_ring", "5_bar"]
    backbone = as_frozen(random_vit())
    settings = dict(num_classes=6, ks=(1, 5, 20), batch_size=8, device=CPU)
    from_folders = knn_evaluate(backbone, train, val, **settings)
    in_memory = knn_evaluate(
        backbone,
        SyntheticScenes(36, SIZE, "train", 3, transform),
        SyntheticScenes(18, SIZE, "test", 3, transform),
        **settings,
    )
    assert from_folders == in_memory


def test_eval_knn_command_writes_json_and_one_line(tmp_path, capsys):
    write_colour_classes(tmp_path / "data" / "train", per_class=6, seed=0)
    write_colour_classes(tmp_path / "data" / "val", per_class=3, seed=1)
    model = random_vit()
    weights = write_export(model, tmp_path / "backbone.safetensors")
    main(
        ["--weights", weights, "--data_path", str(tmp_path / "data"), "--image_size", str(SIZE)]
        + ["--nb_knn", "1", "5", "--batch_size_per_gpu", "4", "--num_workers", "0", "--output_dir", str(tmp_path)]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("k-NN top-1 on 9 val images (3 classes)")
    report = json.loads((tmp_path / "eval_knn.json").read_text())
    assert report["classes"] == ["blue", "green", "red"] and report["num_train"] == 18
    # The command's numbers are the library's on the same images: resize 36 (= 32 * 256 / 224), crop 32.
    transform = eval_transform(SIZE)
    expected = knn_evaluate(
        as_frozen(model),
        LabelledImages(str(tmp_path / "data" / "train"), transform),
        LabelledImages(str(tmp_path / "data" / "val"), transform),
        num_classes=3,
        ks=(1, 5),
        device=CPU,
    )
    assert report["results"] == {str(k): v for k, v in expected.items()}
    assert report["results"]["1"]["top1"] == 100.0  # colour carries the label, even through random features


class _Numbered(torch.utils.data.Dataset):
    """Item i: an image whose pixels encode i, and the label i % 3."""

    def __len__(self):
        return 11

    def __getitem__(self, i):
        return torch.full((3, 4, 4), float(i)) + torch.arange(16.0).view(1, 4, 4), i % 3


def _signature(images):
    return torch.stack([images.sum((1, 2, 3)), images[:, 0, 0, 0] ** 2], dim=1)


def _extract_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    features, targets = extract_features(
        _signature, _Numbered(), batch_size=4, device=CPU, dist_info=DistInfo(rank, world_size, rank)
    )
    torch.save((features, targets), os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_extraction_on_two_processes_equals_one(tmp_path):
    """11 images on 2 processes: padded shards, gathered with their indices back into dataset order."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_extract_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = extract_features(_signature, _Numbered(), batch_size=4, device=CPU)
    assert torch.equal(single[1], torch.arange(11) % 3)
    for rank in (0, 1):
        features, targets = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(features, single[0]) and torch.equal(targets, single[1])


# ---- bad input --------------------------------------------------------------------------------------


def _folders(tmp_path, train_classes=("blue", "green", "red"), val_classes=("blue", "green", "red")):
    write_colour_classes(tmp_path / "data" / "train", per_class=2, seed=0, classes=train_classes)
    write_colour_classes(tmp_path / "data" / "val", per_class=1, seed=1, classes=val_classes)
    return tmp_path / "data"


def _bad_inputs(tmp_path, case):
    """``(extra argv, expected message)`` for one refused input; the rest of the arguments are good."""
    weights = write_export(random_vit(), tmp_path / "backbone.safetensors")
    data = tmp_path / "data"
    if case == "missing data folder":
        return ["--weights", weights, "--data_path", str(tmp_path / "nope")], "is not a folder"
    if case == "no val folder":
        write_colour_classes(data / "train", per_class=1, seed=0)
        return ["--weights", weights, "--data_path", str(data)], "val' is not a folder"
    if case == "no images":
        _folders(tmp_path)
        for f in (data / "val" / "red").iterdir():
            f.unlink()
        return ["--weights", weights, "--data_path", str(data)], "Found no valid file for the classes red"
    if case == "no class folders":
        _folders(tmp_path)
        for folder in ("blue", "green", "red"):
            for f in (data / "train" / folder).iterdir():
                f.rename(data / "train" / f"{folder}_{f.name}")  # loose images, no class folder
            (data / "train" / folder).rmdir()
        return ["--weights", weights, "--data_path", str(data)], "Couldn't find any class folder"
    if case == "classes differ":
        _folders(tmp_path, val_classes=("blue", "green", "yellow"))
        return ["--weights", weights, "--data_path", str(data)], "only in train: ['red'], only in val: ['yellow']"
    _folders(tmp_path)
    if case == "missing weights":
        return ["--weights", str(tmp_path / "none.pth"), "--data_path", str(data)], "does not exist"
    if case == "not a checkpoint":
        (tmp_path / "junk.pth").write_bytes(b"\x00not a checkpoint")
        return ["--weights", str(tmp_path / "junk.pth"), "--data_path", str(data)], "is not a train.py checkpoint"
    if case == "not an export":
        (tmp_path / "junk.safetensors").write_bytes(b"\x00not safetensors")
        return ["--weights", str(tmp_path / "junk.safetensors"), "--data_path", str(data)], "not a backbone exported"
    if case == "unknown timm arch":
        return ["--weights", weights, "--arch", "vit_nonexistent", "--data_path", str(data)], "Unknown model"
    raise AssertionError(case)


BAD_INPUTS = [
    "missing data folder",
    "no val folder",
    "no images",
    "no class folders",
    "classes differ",
    "missing weights",
    "not a checkpoint",
    "not an export",
    "unknown timm arch",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_with_one_line(tmp_path, capsys, case):
    argv, message = _bad_inputs(tmp_path, case)
    with pytest.raises(SystemExit) as stop:
        main(argv + ["--num_workers", "0", "--output_dir", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adclr.eval_knn: error: ") and message in err[0], err
    assert not (tmp_path / "out" / "eval_knn.json").exists()


def test_command_line_exit_status_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "adclr.eval_knn", "--weights", str(tmp_path / "x.pth"), "--data_path", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("adclr.eval_knn: error: ") and "train' is not a folder" in line
