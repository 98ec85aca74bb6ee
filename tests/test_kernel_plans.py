"""Variant and tile selection, tuned tables and ``auto`` dispatch, on CPU: a fake GPU name and a
temporary table stand in for a GPU and the tuner's output."""

import json
import warnings

import pytest
import torch
from attention_utils import max_error

from adclr.kernels import AttentionLayout, adclr_attention, attention, plans
from adclr.kernels import triton_attention as ops

FAKE_GPU = "Fake GPU 9000 80GB"
PARAMS_207 = AttentionLayout(197, 10).kernel_params


@pytest.fixture
def tiles_dir(tmp_path, monkeypatch):
    """An empty per-GPU table directory; ``write`` puts a table for FAKE_GPU there."""
    monkeypatch.setenv("ADCLR_TILES_DIR", str(tmp_path))
    plans.load_table.cache_clear()
    yield tmp_path
    plans.load_table.cache_clear()


def write_table(directory, entries, schema=plans.TABLE_SCHEMA):
    path = directory / (plans.device_slug(FAKE_GPU) + ".json")
    path.write_text(json.dumps({"schema": schema, "device": FAKE_GPU, "entries": entries}))
    plans.load_table.cache_clear()
    return path


def entry(seq_bucket="256", mask="prefix+raw", dtype="bf16", fwd=None, bwd=None, auto=None, block_d=64):
    return {
        "block_d": block_d,
        "seq_bucket": seq_bucket,
        "dtype": dtype,
        "mask": mask,
        "fwd": fwd or {"variant": "v2", "tiles": {"block_m": 128, "block_n": 32, "num_warps": 4, "num_stages": 3}},
        "bwd": bwd or {"variant": "v1", "tiles": None},
        "auto": auto or {"fwd": "sdpa", "fwd+bwd": "triton"},
    }


@pytest.mark.parametrize(
    "length, bucket", [(1, "64"), (47, "64"), (64, "64"), (65, "128"), (207, "256"), (795, "1024"), (1025, "long")]
)
def test_sequence_buckets(length, bucket):
    assert plans.seq_bucket(length) == bucket


@pytest.mark.parametrize(
    "layout, kind",
    [
        (AttentionLayout(197, 10), "prefix+raw"),
        (AttentionLayout(197, 10, 1, "raw"), "raw"),
        (AttentionLayout(197, 10, 1, "raw+self"), "raw+self"),
        (AttentionLayout(197, 10, 0, "raw"), "prefix+raw"),  # no prefix: the same mask
        (AttentionLayout(197, 10, bidirectional=True), "full"),
        (AttentionLayout(197, 0, 1, "raw+self"), "full"),
    ],
)
def test_mask_kind_follows_the_kernel_params(layout, kind):
    assert plans.mask_kind(layout.length, *layout.kernel_params) == kind


@pytest.mark.parametrize(
    "length, backward, fwd_tiles, bwd_tiles",
    [
        (47, "short", plans.Tiles(64, 64, 4, 2), plans.Tiles(0, 0, 4, 1)),
        (207, "fused", plans.Tiles(64, 64, 4, 2), plans.Tiles(64, 32, 4, 2)),
        (795, "fused", plans.Tiles(128, 64, 8, 3), plans.Tiles(64, 32, 4, 2)),
    ],
)
def test_default_plan_at_vit_lengths(length, backward, fwd_tiles, bwd_tiles, tiles_dir):
    """Without a tuned table: one program per head for the 96 px crops, the fused backward above."""
    plan = plans.resolve_plan(length, 64, torch.bfloat16, PARAMS_207, FAKE_GPU)
    assert plan == plans.Plan("v2", fwd_tiles, backward, bwd_tiles)


def test_default_plan_details():
    assert plans.default_plan(47, 64, torch.float32).bwd == "fused"  # fp32's exact products spill in one tile
    assert plans.default_plan(100, 64, torch.float16).bwd == "fused"  # short only up to 64 rows by default
    assert plans.default_plan(47, 128, torch.float16).bwd_tiles.num_warps == 8  # a 64 x 128 tile
    assert plans.default_plan(47, 64, torch.float16, interpreting=True).fwd_tiles == plans.INTERPRETER_TILES
    assert plans.short_eligible(128, 64) and not plans.short_eligible(128, 128) and not plans.short_eligible(129, 16)


def test_tuned_table_decides_variant_tiles_and_backend(tiles_dir):
    write_table(tiles_dir, [entry()])
    plan = plans.resolve_plan(207, 64, torch.bfloat16, PARAMS_207, FAKE_GPU)
    assert plan == plans.Plan("v2", plans.Tiles(128, 32, 4, 3), "v1", None)
    assert plans.tuned_backend(FAKE_GPU, 207, 64, torch.bfloat16, PARAMS_207, "fwd") == "sdpa"
    assert plans.tuned_backend(FAKE_GPU, 207, 64, torch.bfloat16, PARAMS_207, "fwd+bwd") == "triton"
    # Keys the table did not measure keep the defaults: another dtype, bucket, rule or head dim.
    assert plans.resolve_plan(207, 64, torch.float16, PARAMS_207, FAKE_GPU) == plans.default_plan(
        207, 64, torch.float16
    )
    assert plans.resolve_plan(795, 64, torch.bfloat16, PARAMS_207, FAKE_GPU).bwd == "fused"
    raw_self = AttentionLayout(197, 10, 1, "raw+self").kernel_params
    assert plans.tuned_backend(FAKE_GPU, 207, 64, torch.bfloat16, raw_self, "fwd") is None
    assert plans.resolve_plan(207, 80, torch.bfloat16, PARAMS_207, "Another GPU") == plans.default_plan(
        207, 80, torch.bfloat16
    )


def test_autotune_replaces_the_tiles_of_tunable_kernels(tiles_dir, monkeypatch):
    monkeypatch.setenv("ADCLR_AUTOTUNE", "1")
    plan = plans.resolve_plan(207, 64, torch.bfloat16, PARAMS_207, FAKE_GPU)
    assert plan.fwd == "v2" and plan.fwd_tiles is None and plan.bwd == "fused" and plan.bwd_tiles is None
    assert plans.resolve_plan(47, 64, torch.bfloat16, PARAMS_207, FAKE_GPU).bwd_tiles == plans.Tiles(0, 0, 4, 1)


@pytest.mark.parametrize(
    "bad, why",
    [
        (entry(seq_bucket="200"), "seq_bucket"),
        (entry(mask="causal"), "mask"),
        (entry(dtype="fp8"), "dtype"),
        (entry(block_d=48), "block_d"),
        (entry(fwd={"variant": "v3", "tiles": None}), "fwd"),
        (
            entry(fwd={"variant": "v2", "tiles": {"block_m": 96, "block_n": 64, "num_warps": 4, "num_stages": 2}}),
            "power",
        ),
        (
            entry(fwd={"variant": "v2", "tiles": {"block_m": 64, "block_n": 64, "num_warps": 3, "num_stages": 2}}),
            "warps",
        ),
        (
            entry(bwd={"variant": "short", "tiles": {"block_m": 0, "block_n": 0, "num_warps": 4, "num_stages": 1}}),
            "short",
        ),
        (entry(bwd={"variant": "v1", "tiles": {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}}), "v1"),
        (entry(auto={"fwd": "flex", "fwd+bwd": "sdpa"}), "auto"),
        ("not an object", "object"),
    ],
)
def test_invalid_entries_are_skipped_with_a_warning(bad, why, tiles_dir):
    good = entry(mask="raw")
    write_table(tiles_dir, [bad, good])
    with pytest.warns(UserWarning, match=why):
        table = plans.load_table(plans.table_path(FAKE_GPU))
    assert list(table) == [plans.ShapeKey(64, "256", "bf16", "raw")]  # the valid entry survives
    assert plans.resolve_plan(207, 64, torch.bfloat16, PARAMS_207, FAKE_GPU) == plans.default_plan(
        207, 64, torch.bfloat16
    )


@pytest.mark.parametrize("content", ["{not json", json.dumps({"schema": 99, "entries": []}), json.dumps([1, 2])])
def test_unreadable_table_falls_back_to_the_defaults(content, tiles_dir):
    (tiles_dir / (plans.device_slug(FAKE_GPU) + ".json")).write_text(content)
    with pytest.warns(UserWarning, match="ignoring tuned tile table"):
        plan = plans.resolve_plan(207, 64, torch.bfloat16, PARAMS_207, FAKE_GPU)
    assert plan == plans.default_plan(207, 64, torch.bfloat16)


def test_table_is_read_once(tiles_dir):
    path = write_table(tiles_dir, [entry()])
    assert plans.tuned_backend(FAKE_GPU, 207, 64, torch.bfloat16, PARAMS_207, "fwd") == "sdpa"
    path.write_text("{not json")  # a later change is not re-read (no warning, same answer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plans.tuned_backend(FAKE_GPU, 207, 64, torch.bfloat16, PARAMS_207, "fwd") == "sdpa"


def test_checked_in_tables_are_valid():
    """Every table under kernels/tiles/ parses without a skipped entry."""
    import glob
    import os

    for path in glob.glob(os.path.join(plans.TILES_DIR, "*.json")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plans.load_table.cache_clear()
            assert plans.load_table(path), path
    plans.load_table.cache_clear()


@pytest.fixture
def fake_gpu(monkeypatch, tiles_dir):
    """``auto`` behaves as on an sm80+ GPU named FAKE_GPU (the tensors stay on CPU)."""
    monkeypatch.setattr(attention, "triton_is_default", lambda device: True)
    monkeypatch.setattr(attention, "device_name", lambda device: FAKE_GPU)
    return tiles_dir


def test_auto_picks_the_tuned_backend_per_mode(fake_gpu):
    write_table(fake_gpu, [entry(auto={"fwd": "sdpa", "fwd+bwd": "triton"})])
    layout = AttentionLayout(197, 10)
    t = torch.zeros(1, 1, 207, 64, dtype=torch.bfloat16)
    resolve = attention._resolve_backend
    assert resolve("auto", t, 64, 0.0, layout, needs_grad=False) == "sdpa"
    assert resolve("auto", t, 64, 0.0, layout, needs_grad=True) == "triton"
    # Unmeasured keys: the fused kernel; reasons to leave it: dropout, float64, huge head dims.
    assert resolve("auto", t.half(), 64, 0.0, layout, needs_grad=False) == "triton"
    assert resolve("auto", t, 64, 0.1, layout, needs_grad=False) == "sdpa"
    assert resolve("auto", t.double(), 64, 0.0, layout, needs_grad=False) == "sdpa"
    assert resolve("auto", t, 512, 0.0, layout, needs_grad=False) == "sdpa"
    assert resolve("triton", t, 64, 0.0, layout, needs_grad=False) == "triton"  # explicit choices stand


def test_auto_end_to_end_follows_the_table(fake_gpu):
    """The same call runs SDPA when the table says so (both compute the layout's function)."""
    write_table(fake_gpu, [entry(seq_bucket="64", dtype="fp32", auto={"fwd": "sdpa", "fwd+bwd": "sdpa"})])
    layout = AttentionLayout(37, 10)
    q, k, v = (torch.randn(1, 2, 47, 64) for _ in range(3))
    calls = []
    original = attention.sdpa_attention
    attention.sdpa_attention = lambda *a: calls.append(1) or original(*a)
    try:
        out = adclr_attention(q, k, v, layout)
    finally:
        attention.sdpa_attention = original
    assert calls and max_error(out, adclr_attention(q, k, v, layout, backend="reference")) < 1e-5


def test_v2_grid_puts_the_sequence_block_fastest():
    """Programs of one head are adjacent: the grid is (blocks x B*H,) and v1's is (B*H, blocks)."""
    q = torch.zeros(3, 5, 207, 64, dtype=torch.float16)
    o, o_view, lse = ops.forward_outputs(q, seq_major=False)
    plan = plans.default_plan(207, 64, torch.float16)
    (launch,) = ops.forward_launches(q, q, q, o_view, lse, PARAMS_207, 0.125, plan, (9, 0))
    assert launch.grid({"BLOCK_M": 64}) == (4 * 15,)
    grads, (dq, dk, dv) = ops.gradient_outputs(q, seq_major=False)
    (fused,) = ops.backward_launches(q, q, q, q, o_view, lse, dq, dk, dv, PARAMS_207, 0.125, plan, (9, 0))
    assert fused.grid({"BLOCK_OWN": 64}) == (2 * 4 * 15,)
    v1 = ops.forward_launches(q, q, q, o_view, lse, PARAMS_207, 0.125, plans.Plan("v1", None, "v1", None), (9, 0))
    assert v1[0].grid({"BLOCK_M": 64}) == (15, 4)
