"""The evaluation plumbing: one backbone interface, three weight sources, the built-in folders, the trainer's call."""

import os
from dataclasses import replace

import numpy as np
import pytest
import timm
import torch
from engine_utils import SETTINGS, batch, tiny_config
from eval_utils import PATCH, SIZE, random_vit, write_export
from PIL import Image

from adclr import train_step
from adclr.checkpoint import load_backbone, save_checkpoint
from adclr.data import SEGMENTATION_CLASSES, SHAPES, LabelledImages, SegmentationFolder, SyntheticScenes, write_scenes
from adclr.evaluation.during_training import EvalConfig, evaluate_backbone
from adclr.evaluation.features import FrozenBackbone, load_frozen_backbone

CPU = torch.device("cpu")


def test_frozen_backbone_reads_adclr_vit_like_its_own_forward():
    model = random_vit()
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        features = FrozenBackbone(model)(images, n_last_blocks=3)
        out = model(images)
        x, layout = model.tokens_and_layout(images, None)  # ADCLR's own path, block by block
        per_block = []
        for block in model.blocks:
            x = block(x, attn_mask=layout)
            per_block.append(model.norm(x)[:, 0])
    assert features.cls_blocks.shape == (3, 3, model.embed_dim) and features.grid == (SIZE // PATCH,) * 2
    torch.testing.assert_close(features.cls, out.cls)
    torch.testing.assert_close(features.patches, out.patches)
    torch.testing.assert_close(features.cls_blocks, torch.stack(per_block[-3:], dim=1))


def test_frozen_backbone_reads_a_timm_vit_like_dino():
    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, depth=3, embed_dim=48, num_heads=2, img_size=32
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = FrozenBackbone(model)(images, n_last_blocks=2)
        tokens = model.forward_features(images)
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        hidden = []
        for block in model.blocks:
            x = block(x)
            hidden.append(model.norm(x))  # DINO's get_intermediate_layers: the final norm on each block
    torch.testing.assert_close(features.cls, tokens[:, 0])
    torch.testing.assert_close(features.patches, tokens[:, 1:])
    torch.testing.assert_close(features.cls_blocks, torch.stack([h[:, 0] for h in hidden[-2:]], dim=1))
    with pytest.raises(ValueError, match="n_last_blocks must be in"):
        FrozenBackbone(model)(images, n_last_blocks=4)


def test_frozen_backbone_refuses_a_model_without_cls_token():
    model = timm.create_model("vit_small_patch16_224", pretrained=False, class_token=False, global_pool="avg", depth=1)
    with pytest.raises(ValueError, match="CLS token"):
        FrozenBackbone(model)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint as train.py writes it (the train state after a step, so teacher and student differ)."""
    path = str(tmp_path_factory.mktemp("run") / "checkpoint.pth")
    config = tiny_config()
    state = train_step.build_train_state(config, torch.device("cpu"))
    train_step.training_step(state, *batch(config), SETTINGS)
    save_checkpoint(path, state, config, epoch=1, history=[])
    return path


def test_three_weight_sources_give_the_same_features(checkpoint, tmp_path):
    images = torch.randn(2, 3, SIZE, SIZE)
    teacher, student = (load_backbone(checkpoint, which)[0].eval() for which in ("teacher", "student"))
    exported = write_export(teacher, tmp_path / "teacher.safetensors")
    timm_weights = tmp_path / "timm.pth"
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True)
    timm_model.eval()
    torch.save(timm_model.state_dict(), timm_weights)
    with torch.no_grad():
        ours = {which: load_frozen_backbone(checkpoint, which)(images).cls for which in ("teacher", "student")} | {
            "export": load_frozen_backbone(exported)(images).cls
        }
        torch.testing.assert_close(ours["teacher"], teacher(images).cls)
        torch.testing.assert_close(ours["student"], student(images).cls)
        torch.testing.assert_close(ours["export"], teacher(images).cls)
        assert not torch.allclose(ours["teacher"], ours["student"])  # --which picks a different network
        timm_cls = load_frozen_backbone(str(timm_weights), arch="vit_tiny_patch16_224")(images).cls
        torch.testing.assert_close(timm_cls, timm_model.forward_features(images)[:, 0])
    loaded = load_frozen_backbone(checkpoint)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ValueError, match="which must be one of"):
        load_frozen_backbone(checkpoint, "ema")
    with pytest.raises(ValueError, match="no hub prefix"):
        load_frozen_backbone(str(timm_weights), arch="hf-hub:timm/vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="cannot build timm model"):  # weights of another architecture
        load_frozen_backbone(str(timm_weights), arch="deit_tiny_distilled_patch16_224")


def test_written_scenes_read_back_exactly(tmp_path):
    write_scenes(str(tmp_path), train_size=8, val_size=7, size=SIZE, seed=5)
    for folder, split, length in (("train", "train", 8), ("val", "test", 7)):
        labelled = LabelledImages(str(tmp_path / "classification" / folder))
        segmentation = SegmentationFolder(str(tmp_path / "segmentation" / folder))
        scenes = SyntheticScenes(length, SIZE, split, seed=5)
        assert len(labelled) == len(segmentation) == length
        assert labelled.classes == [f"{i}_{name}" for i, name in enumerate(SHAPES)]
        by_index = {int(os.path.basename(path)[:-4]): (path, label) for path, label in labelled.samples}
        for index in range(length):
            image, mask, label = scenes.generate(index)
            path, folder_label = by_index[index]
            assert folder_label == label
            assert np.array_equal(np.asarray(Image.open(path)), image.permute(1, 2, 0).numpy())
            seg_image, seg_mask = segmentation[index]
            assert np.array_equal(np.asarray(seg_image), image.permute(1, 2, 0).numpy())
            assert torch.equal(seg_mask, mask) and int(mask.max()) < len(SEGMENTATION_CLASSES)


def test_evaluate_backbone_is_seeded_and_leaves_the_caller_alone(tmp_path):
    model = random_vit().train()
    config = EvalConfig(image_size=SIZE, resize_size=SIZE, builtin_train_size=36, builtin_test_size=18, seg_epochs=2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = evaluate_backbone(model, config, CPU)
    assert torch.equal(torch.get_rng_state(), before) and model.training
    assert first == evaluate_backbone(model, config, CPU)
    assert set(first) == {"knn_top1", "knn_top5", "dense_miou"}
    assert all(0 <= value <= 100 for value in first.values())

    # With a data path: the k-NN on that folder (here the same scenes, written out), no dense probe.
    write_scenes(str(tmp_path / "data"), train_size=36, val_size=18, size=SIZE, seed=0)
    on_folder = evaluate_backbone(model, replace(config, data_path=str(tmp_path / "data" / "classification")), CPU)
    assert on_folder == {"knn_top1": first["knn_top1"], "knn_top5": first["knn_top5"]}
    with pytest.raises(ValueError, match="is not a folder"):
        evaluate_backbone(model, EvalConfig(data_path=str(tmp_path / "missing")), CPU)


@pytest.mark.parametrize("command", ["eval_knn", "eval_linear", "eval_seg"])
def test_an_image_size_that_is_not_whole_patches_is_refused_in_one_line(tmp_path, capsys, command):
    """--image_size 28 on a patch-8 backbone: one error line naming the flag and the sizes that fit, exit
    status 2, before any feature is extracted (timm would end in an AssertionError deep inside)."""
    import importlib

    from eval_utils import write_colour_classes, write_colour_segmentation

    data = tmp_path / "data"
    for split, seed in (("train", 0), ("val", 1)):
        if command == "eval_seg":
            write_colour_segmentation(data / split, 2, seed=seed)
        else:
            write_colour_classes(data / split, 2, seed=seed)
    weights = write_export(random_vit(), tmp_path / "backbone.safetensors")
    main = importlib.import_module(f"adclr.{command}").main
    args = ["--weights", weights, "--data_path", str(data), "--num_workers", "0", "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as caught:
        main([*args, "--image_size", "28"])
    assert caught.value.code == 2
    assert capsys.readouterr().err == (
        f"adclr.{command}: error: --image_size 28 must be a multiple of the backbone's patch size {PATCH}, "
        "e.g. 24 or 32\n"
    )
    assert not any(name.endswith(".json") for name in os.listdir(tmp_path))


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")
@pytest.mark.parametrize(
    "capability, dtype", [((7, 0), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)]
)
def test_feature_extraction_autocasts_by_the_bf16_rule(monkeypatch, capability, dtype):
    """bf16 on GPUs with bf16 units (sm80+), fp16 below (V100: bf16 emulated), as training's default; none on CPU."""
    from adclr.evaluation import features

    monkeypatch.setattr(features, "capability", lambda device: capability)
    assert features.autocast(torch.device("cuda", 0)).fast_dtype == dtype
    assert not isinstance(features.autocast(torch.device("cpu")), torch.autocast)
