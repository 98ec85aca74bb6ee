"""train.py end to end on tiny configurations: a run, resume, DDP on two CPU processes, NaN, export."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import timm
import torch
import torch.multiprocessing as mp

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "--builtin_train_size",
    "48",
    "--builtin_test_size",
    "24",
    "--batch_size_per_gpu",
    "8",
    "--num_workers",
    "0",
    "--out_dim",
    "64",
    "--head_hidden_dim",
    "32",
    "--head_bottleneck_dim",
    "16",
    "--local_crops_number",
    "2",
    "--num_query",
    "3",
    "--precision",
    "fp32",
    "--warmup_epochs",
    "1",
    "--saveckp_freq",
    "1",
]

pytestmark = pytest.mark.slow


def run(output_dir, *extra):
    return train.main(train.get_args_parser().parse_args(TINY + ["--output_dir", str(output_dir), *extra]))


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_entry_point_trains_checkpoints_and_evaluates(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--epochs", "1", "--output_dir", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "k-NN top-1 on the built-in shapes" in result.stdout
    record = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert all(torch.isfinite(torch.tensor(record[k])) for k in ("loss", "cls", "query"))
    assert 0 <= record["knn_top1_teacher"] <= 100 and 0 <= record["dense_miou_random_init"] <= 100
    state = torch.load(out / "checkpoint.pth", weights_only=False)
    assert state["epoch"] == 1 and {"student", "teacher", "optimizer", "scaler", "loss", "args"} <= set(state)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = run(tmp_path / "full", "--epochs", "2")
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "full" / "checkpoint0001.pth", resumed_dir / "checkpoint.pth")  # as if stopped after epoch 1
    resumed = run(resumed_dir, "--epochs", "2")
    for a, b in ((full.student, resumed.student), (full.teacher, resumed.teacher)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert (x - y).abs().max() <= 1e-6, name
    assert resumed.history[0] == full.history[0]  # epoch 1's record came back from the checkpoint


def _ddp_worker(rank, world_size, port, output_dir, result_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    result = run(output_dir, "--epochs", "1", "--builtin_train_size", "32")
    torch.save(result.student.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))


def test_ddp_two_cpu_processes_keep_identical_students(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path / "run"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert (tmp_path / "run" / "checkpoint.pth").exists()


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    run(tmp_path, "--epochs", "1")
    before = digest(tmp_path / "checkpoint.pth")

    from adclr.fused_loss import FusedADCLRLoss
    from adclr.loss import ADCLRLoss

    for loss_class in (ADCLRLoss, FusedADCLRLoss):  # whichever --fused_loss picks

        def poisoned(self, *args, real_forward=loss_class.forward, **kwargs):
            terms = real_forward(self, *args, **kwargs)
            terms.total = terms.total * float("nan")
            return terms

        monkeypatch.setattr(loss_class, "forward", poisoned)
    with pytest.raises(SystemExit, match="Loss is nan at epoch 2, iteration 0.*last good checkpoint"):
        run(tmp_path, "--epochs", "2")
    assert digest(tmp_path / "checkpoint.pth") == before


def test_export_loads_into_timm_strictly_with_the_same_features(tmp_path):
    from adclr.export import export, load_exported

    result = run(tmp_path, "--epochs", "1")
    kwargs = export(str(tmp_path / "checkpoint.pth"), str(tmp_path / "backbone.safetensors"))
    model = load_exported(str(tmp_path / "backbone.safetensors"))
    direct = timm.create_model(pretrained=False, **kwargs)
    from safetensors.torch import load_file

    direct.load_state_dict(load_file(tmp_path / "backbone.safetensors"), strict=True)
    images = torch.randn(3, 3, 32, 32)
    teacher = result.teacher.backbone.eval()
    with torch.no_grad():
        ours = teacher(images)
        theirs = model.forward_features(images)
    assert (ours.cls - theirs[:, 0]).abs().max() <= 1e-5
    assert (ours.patches - theirs[:, 1:]).abs().max() <= 1e-5


def test_visualize_writes_attention_pictures(tmp_path):
    from PIL import Image

    from adclr.visualize import main as visualize

    run(tmp_path, "--epochs", "1")
    visualize(
        ["--checkpoint", str(tmp_path / "checkpoint.pth"), "--output_dir", str(tmp_path / "pics"), "--num_query", "3"]
    )
    cls_png = Image.open(tmp_path / "pics" / "cls_attention.png")
    query_png = Image.open(tmp_path / "pics" / "query_attention.png")
    heads = 3  # vit_pico
    assert cls_png.size[0] > (heads + 1) * 32 and query_png.size[1] > 3 * 32


def test_unreadable_images_are_skipped(tmp_path):
    from PIL import Image

    from adclr.data import ImageFiles

    (tmp_path / "cats").mkdir()
    Image.new("RGB", (20, 20), "red").save(tmp_path / "cats" / "a.png")
    (tmp_path / "cats" / "broken.jpg").write_bytes(b"not an image")
    dataset = ImageFiles(str(tmp_path))
    assert len(dataset) == 2
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        image, label = dataset[1]
    assert image.size == (20, 20) and label == 0
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.jpg")
    assert ImageFiles(str(flat))[0][1] == -1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFiles(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="data_path"):
        ImageFiles(str(tmp_path / "missing"))
