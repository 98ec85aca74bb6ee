"""train.py end to end, run as users run it: a run, resume (from a corrupt checkpoint's numbered fallback, and
after a kill during the final evaluation), NaN and gradient-scaler stops, torchrun on two CPU processes, an
unreadable checkpoint; then export and pictures from the run's checkpoint."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import timm
import torch
from engine_utils import assert_same

from adclr.checkpoint import load_backbone, load_checkpoint
from adclr.lock import LOCK_NAME

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")

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

# train.py with the loss poisoned to NaN: the real entry point, its real error path.
POISONED_LOSS = """
import runpy, sys
from adclr.fused_loss import FusedADCLRLoss
from adclr.loss import ADCLRLoss
for loss_class in (ADCLRLoss, FusedADCLRLoss):  # whichever --fused_loss picks
    def poisoned(self, *args, real_forward=loss_class.forward, **kwargs):
        terms = real_forward(self, *args, **kwargs)
        terms.total = terms.total * float("nan")
        return terms
    loss_class.forward = poisoned
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# train.py killed the moment its final evaluation starts (the random-init baseline is built first).
KILLED_IN_EVALUATION = """
import os, runpy, sys
from adclr import train_step
train_step.random_init_backbone = lambda *args, **kwargs: os._exit(3)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# train.py with a gradient scaler on (as fp16 on a GPU has) and every gradient infinite: every step is skipped.
SKIPPING_SCALER = """
import runpy, sys
import torch
from adclr import train_step
real_build = train_step.build_train_state
def build(*args, **kwargs):
    state = real_build(*args, **kwargs)
    state.scaler = torch.amp.GradScaler("cpu")
    for param in state.student.parameters():
        if param.requires_grad:
            param.register_hook(lambda grad: grad * float("inf"))
    return state
train_step.build_train_state = build
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

pytestmark = pytest.mark.slow


def train(output_dir, *flags, launcher=(TRAIN,)):
    """Run ``train.py`` (through ``launcher``) on the tiny configuration; returns the finished process."""
    command = [sys.executable, *launcher, *TINY, "--output_dir", str(output_dir), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, cwd=output_dir.parent, env=env)


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def written(run_dir):
    """The files a run left in ``run_dir``, its lock file aside (released: emptied, as any exit but a kill leaves)."""
    names = sorted(os.listdir(run_dir))
    if LOCK_NAME in names:
        assert (run_dir / LOCK_NAME).read_text() == "", "the lock was not released"
    return [name for name in names if name != LOCK_NAME]


def log_records(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def without_speed(records):
    return [{key: value for key, value in record.items() if key != "images_per_s"} for record in records]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A finished two-epoch run (its process and output folder), shared by the tests that read it."""
    run_dir = tmp_path_factory.mktemp("two_epochs") / "run"  # train.py creates it
    result = train(run_dir, "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return result, run_dir


def test_entry_point_trains_checkpoints_and_evaluates(two_epochs):
    result, run_dir = two_epochs
    assert "preset builtin (no --data_path): arch=vit_pico" in result.stdout
    assert "k-NN top-1 on the built-in scenes" in result.stdout
    records = log_records(run_dir)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r[k] for r in records])).all() for k in ("loss", "cls", "query"))
    for key in ("knn_top1_teacher", "knn_top1_random_init", "dense_miou_teacher", "dense_miou_random_init"):
        assert 0 <= records[-1][key] <= 100, key
    raw = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    assert (raw["format"], raw["version"], raw["epoch"]) == ("adclr-checkpoint", 1, 2)
    assert raw["history"] == records
    assert raw["config"]["optim"]["epochs"] == 2 and raw["config"]["run"]["output_dir"] == str(run_dir)
    assert load_checkpoint(str(run_dir / "checkpoint0001.pth")).epoch == 1


def test_loader_workers_do_not_change_the_run(two_epochs, tmp_path):
    """Each image's crops come from (seed, epoch, index): two loader workers train exactly as the main
    process alone does (same losses, same teacher), at the same intra-op thread count (reported)."""
    result, run_dir = two_epochs
    assert "intra-op threads: 1 (OMP_NUM_THREADS=1)" in result.stdout
    workers = train(tmp_path / "run", "--epochs", "2", "--num_workers", "2")
    assert workers.returncode == 0, workers.stderr[-3000:]
    assert without_speed(log_records(tmp_path / "run")) == without_speed(log_records(run_dir))
    teachers = [torch.load(d / "checkpoint.pth", weights_only=True)["teacher"] for d in (run_dir, tmp_path / "run")]
    assert_same(*teachers)


def test_resume_from_a_corrupt_checkpoint_reproduces_the_uninterrupted_run(two_epochs, tmp_path):
    """checkpoint.pth torn (as by a crash on a file system without atomic rename): it is named, moved aside
    and the run resumes from checkpoint0001.pth, ending exactly as the run that was never stopped."""
    _, full = two_epochs
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(full / "checkpoint0001.pth", resumed / "checkpoint0001.pth")  # as if stopped after epoch 1
    torn = (full / "checkpoint.pth").read_bytes()[:100_000]
    (resumed / "checkpoint.pth").write_bytes(torn)
    result = train(resumed, "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    latest = resumed / "checkpoint.pth"
    assert f"warning: {latest} cannot be read as a checkpoint (truncated" in result.stdout
    assert f"resumed from {resumed / 'checkpoint0001.pth'} at epoch 1" in result.stdout
    (moved,) = [name for name in os.listdir(resumed) if name.startswith("checkpoint.pth.corrupt-")]
    assert (resumed / moved).read_bytes() == torn  # kept, never deleted
    a, b = load_checkpoint(str(full / "checkpoint.pth")), load_checkpoint(str(latest))
    for key in ("student", "teacher", "loss", "optimizer"):
        assert_same(a.states[key], b.states[key], key)
    assert b.history[0] == a.history[0]  # epoch 1's record came back from the checkpoint
    assert log_records(resumed) == b.history  # one line per epoch, none lost or repeated
    last_full, last_resumed = log_records(full)[-1], log_records(resumed)[-1]
    for key in ("loss", "cls", "query", "knn_top1_teacher", "knn_top1_random_init", "dense_miou_random_init"):
        assert last_resumed[key] == last_full[key], key  # the baseline is rebuilt from the seed, identically


def test_a_run_killed_in_its_evaluation_keeps_the_epoch_and_evaluates_on_rerun(two_epochs, tmp_path):
    _, full = two_epochs
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(full / "checkpoint0001.pth", run_dir / "checkpoint.pth")
    killed = train(run_dir, "--epochs", "2", launcher=("-c", KILLED_IN_EVALUATION, TRAIN))
    assert killed.returncode == 3, killed.stderr[-3000:]
    saved = load_checkpoint(str(run_dir / "checkpoint.pth"))
    assert saved.epoch == 2 and "knn_top1_teacher" not in saved.history[-1]  # written before the evaluation
    assert [r["epoch"] for r in log_records(run_dir)] == [1]  # epoch 2 is not finished until it is evaluated

    rerun = train(run_dir, "--epochs", "2")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoint.pth'} at epoch 2" in rerun.stdout
    assert "epoch 2/2" not in rerun.stderr  # no training: the epoch was kept
    assert "k-NN top-1 on the built-in scenes" in rerun.stdout
    # the same records as the run never stopped (speed aside), none twice, in the log and the checkpoint
    assert without_speed(log_records(run_dir)) == without_speed(log_records(full))
    after = load_checkpoint(str(run_dir / "checkpoint.pth"))
    assert after.history == log_records(run_dir)
    assert_same(after.states["teacher"], saved.states["teacher"])


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(two_epochs, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(two_epochs[1] / "checkpoint.pth", run_dir / "checkpoint.pth")
    before = digest(run_dir / "checkpoint.pth")
    result = train(run_dir, "--epochs", "3", launcher=("-c", POISONED_LOSS, TRAIN))
    assert result.returncode != 0
    checkpoint = run_dir / "checkpoint.pth"
    assert result.stderr.strip().splitlines()[-1] == (
        f"Loss is nan at epoch 3, iteration 0; stopping training (the last good checkpoint is {checkpoint})."
    )
    assert digest(checkpoint) == before
    assert written(run_dir) == ["checkpoint.pth", "log.jsonl"]
    assert log_records(run_dir) == load_checkpoint(str(checkpoint)).history  # restored from the checkpoint


def test_a_gradient_scaler_that_skips_every_step_stops_the_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    flags = ("--epochs", "2", "--builtin_train_size", "160", "--batch_size_per_gpu", "4", "--num_query", "0")
    result = train(run_dir, *flags, launcher=("-c", SKIPPING_SCALER, TRAIN))  # 40 iterations an epoch
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "the fp16 gradient scaler skipped the last 30 optimizer steps in a row (non-finite gradients every time; "
        "loss scale now 6.1e-05) at epoch 1, iteration 29; stopping training (no checkpoint was written yet). "
        "Try --precision bf16 or fp32, or a lower --lr."
    )
    assert written(run_dir) == []


def test_torchrun_on_two_cpu_processes(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TRAIN)
    result = train(run_dir, "--epochs", "1", "--builtin_train_size", "32", launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("preset builtin") == 1  # only the main process logs
    assert load_checkpoint(str(run_dir / "checkpoint.pth")).epoch == 1
    assert len(log_records(run_dir)) == 1


def test_an_unreadable_checkpoint_without_a_fallback_stops_the_run_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pth").write_bytes(b"half a checkpoint")
    result = train(run_dir, "--epochs", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f"error: cannot resume: {run_dir / 'checkpoint.pth'} cannot be read as a checkpoint"
    )
    assert "there is no numbered checkpoint" in result.stderr
    assert written(run_dir) == ["checkpoint.pth"]  # left where it was: the next rerun stops the same way
    assert (run_dir / "checkpoint.pth").read_bytes() == b"half a checkpoint"


def test_export_loads_into_timm_strictly_with_the_same_features(two_epochs, tmp_path):
    from safetensors.torch import load_file

    from adclr.export import export, load_exported

    checkpoint = str(two_epochs[1] / "checkpoint.pth")
    output = str(tmp_path / "backbone.safetensors")
    kwargs = export(checkpoint, output)
    exported = load_file(output)
    teacher = load_checkpoint(checkpoint).states["teacher"]
    assert_same(exported, {k[len("backbone.") :]: v for k, v in teacher.items() if k.startswith("backbone.")})
    model = load_exported(output)
    direct = timm.create_model(pretrained=False, **kwargs)
    direct.load_state_dict(exported, strict=True)
    images = torch.randn(3, 3, 32, 32)
    ours, _ = load_backbone(checkpoint)
    with torch.no_grad():
        features = ours(images)
        theirs = model.forward_features(images)
    assert (features.cls - theirs[:, 0]).abs().max() <= 1e-5
    assert (features.patches - theirs[:, 1:]).abs().max() <= 1e-5


def test_visualize_writes_attention_pictures(two_epochs, tmp_path):
    from PIL import Image

    from adclr.visualize import main as visualize

    checkpoint = str(two_epochs[1] / "checkpoint.pth")
    visualize(["--checkpoint", checkpoint, "--output_dir", str(tmp_path / "pics"), "--num_query", "3"])
    cls_png = Image.open(tmp_path / "pics" / "cls_attention.png")
    query_png = Image.open(tmp_path / "pics" / "query_attention.png")
    heads, side = 3, 48 * 5  # vit_pico: the image, the mean map, one map per head; 48 px x 5 >= 224, 2 px between
    assert cls_png.size == ((heads + 2) * (side + 2) + 2, side + 4)
    assert query_png.size == (4 * (side + 2) + 2, side + 4)


def test_unreadable_images_are_skipped(tmp_path):
    from PIL import Image

    from adclr.data import ImageFiles

    (tmp_path / "cats").mkdir()
    Image.new("RGB", (20, 20), "red").save(tmp_path / "cats" / "a.png")
    (tmp_path / "cats" / "broken.jpg").write_bytes(b"not an image")
    dataset = ImageFiles(str(tmp_path), check_limit=0)  # as in a folder too large to read every header at start
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


def test_eval_data_path_drives_the_evaluation(tmp_path):
    """--eval_data_path: the k-NN runs on that folder (the teacher's number equals evaluate_backbone's
    on the checkpoint's teacher), without the built-in dense probe; a bad folder stops before training."""
    from adclr.data import write_scenes
    from adclr.evaluation.during_training import EvalConfig, evaluate_backbone

    write_scenes(str(tmp_path / "scenes"), train_size=30, val_size=12, size=48, seed=5)
    folder = str(tmp_path / "scenes" / "classification")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = train(run_dir, "--epochs", "1", "--eval_data_path", folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"k-NN top-1 on {folder}" in result.stdout
    record = log_records(run_dir)[-1]
    assert "dense_miou_teacher" not in record and "dense_miou_random_init" not in record
    teacher, _ = load_backbone(str(run_dir / "checkpoint.pth"))
    expected = evaluate_backbone(teacher, EvalConfig(data_path=folder, image_size=48), torch.device("cpu"))
    assert record["knn_top1_teacher"] == pytest.approx(expected["knn_top1"], abs=1e-9)

    missing = tmp_path / "missing_eval"
    bad_run = tmp_path / "bad_run"
    result = train(bad_run, "--epochs", "1", "--eval_data_path", str(missing))
    assert result.returncode != 0 and "--eval_data_path" in result.stderr and "does not exist" in result.stderr
    assert not bad_run.exists()
