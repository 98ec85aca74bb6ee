"""Variant and tile selection, tuned tables and ``auto`` dispatch, on CPU: a fake GPU name and a
temporary table stand in for a GPU and the tuner's output."""

import dataclasses
import json
import os
import warnings

import pytest
import torch
from attention_utils import check_table_file, max_error

from adclr.kernels import AttentionLayout, adclr_attention, attention, device, plans
from adclr.kernels import triton_attention as ops

FAKE_GPU = "Fake GPU 9000 80GB"
PARAMS_207 = AttentionLayout(197, 10).kernel_params
T = plans.Tiles


@pytest.fixture
def tiles_dir(tmp_path, monkeypatch):
    """An empty per-GPU table directory; ``write`` puts a table for FAKE_GPU there."""
    monkeypatch.setenv("ADCLR_TILES_DIR", str(tmp_path))
    plans.clear_table_cache()
    yield tmp_path
    plans.clear_table_cache()


def write_table(directory, entries, schema=plans.TABLE_SCHEMA):
    path = directory / (plans.device_slug(FAKE_GPU) + ".json")
    path.write_text(json.dumps({"schema": schema, "device": FAKE_GPU, "entries": entries}))
    plans.clear_table_cache()
    return path


def entry(seq_bucket="256", mask="prefix+raw", dtype="bf16", fwd=None, bwd=None, auto=None, block_d=64):
    return {
        "block_d": block_d,
        "seq_bucket": seq_bucket,
        "dtype": dtype,
        "mask": mask,
        "fwd": fwd or {"variant": "v2", "tiles": {"block_m": 128, "block_n": 32, "num_warps": 4, "num_stages": 3}},
        "bwd": bwd or {"variant": "fused", "tiles": {"block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": 3}},
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
        (47, "short", plans.Tiles(64, 64, 4, 3), plans.Tiles(0, 0, 4, 1)),
        (207, "fused", plans.Tiles(64, 64, 4, 3), plans.Tiles(64, 32, 4, 3)),
        (795, "fused", plans.Tiles(128, 64, 8, 3), plans.Tiles(64, 32, 4, 3)),
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
    # One tile of at most 64 rows (128-row tiles spill on sm90) and 64 x 128 elements.
    assert plans.short_eligible(64, 128) and not plans.short_eligible(65, 16) and not plans.short_eligible(64, 256)


def test_tuned_table_decides_variant_tiles_and_backend(tiles_dir):
    write_table(tiles_dir, [entry()])
    plan = plans.resolve_plan(207, 64, torch.bfloat16, PARAMS_207, FAKE_GPU)
    assert plan == plans.Plan("v2", plans.Tiles(128, 32, 4, 3), "fused", plans.Tiles(32, 32, 4, 3))
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


@pytest.mark.parametrize("head_dim, dtype", [(80, torch.bfloat16), (128, torch.float16), (64, torch.float32)])
def test_autotune_keeps_the_table_tiles_where_its_candidates_spill(head_dim, dtype, tiles_dir, monkeypatch):
    """The autotuner's candidates were checked spill-free at padded D <= 64 in fp16/bf16 only."""
    monkeypatch.setenv("ADCLR_AUTOTUNE", "1")
    plan = plans.resolve_plan(207, head_dim, dtype, PARAMS_207, FAKE_GPU)
    assert plan == plans.default_plan(207, head_dim, dtype) and plan.fwd_tiles is not None
    # The launches take the table's tiles, not the autotuner.
    q = torch.zeros(1, 2, 207, head_dim, dtype=dtype)
    o, o_view, lse = ops.forward_outputs(q, seq_major=False)
    (launch,) = ops.forward_launches(q, q, q, o_view, lse, PARAMS_207, 0.125, plan, (9, 0))
    assert launch.tiles == plan.fwd_tiles and launch.kernel is not ops._AUTOTUNED["v2_fwd"]
    _, (dq, dk, dv) = ops.gradient_outputs(q, seq_major=False)
    (launch,) = ops.backward_launches(q, q, q, q, o_view, lse, dq, dk, dv, PARAMS_207, 0.125, plan, (9, 0))
    assert launch.tiles == plan.bwd_tiles and launch.kernel is not ops._AUTOTUNED["fused"]
    # At D = 64 in bf16 the same launches do autotune.
    q = torch.zeros(1, 2, 207, 64, dtype=torch.bfloat16)
    o, o_view, lse = ops.forward_outputs(q, seq_major=False)
    autotuned = plans.resolve_plan(207, 64, torch.bfloat16, PARAMS_207, FAKE_GPU)
    (launch,) = ops.forward_launches(q, q, q, o_view, lse, PARAMS_207, 0.125, autotuned, (9, 0))
    assert launch.tiles is None and launch.kernel is ops._AUTOTUNED["v2_fwd"]


def test_a_valid_short_entry_fits_every_call_of_its_key():
    """``resolve_plan`` takes a table's short backward as it is: every call of the entry's key must
    fit one tile, which ``parse_entry`` guarantees by checking the bucket's largest L."""
    short = {"variant": "short", "tiles": {"block_m": 0, "block_n": 0, "num_warps": 4, "num_stages": 1}}
    accepted = 0
    for block_d in plans.BLOCK_DS:
        for bucket in plans.BUCKET_NAMES:
            try:
                plans.parse_entry(entry(seq_bucket=bucket, block_d=block_d, bwd=short))
            except ValueError:
                continue
            accepted += 1
            for seq_len in range(1, int(bucket) + 1):
                for head_dim in range(block_d // 2 + 1 if block_d > 16 else 1, block_d + 1):
                    assert plans.short_eligible(seq_len, head_dim), (block_d, bucket, seq_len, head_dim)
    assert accepted >= 4  # bucket 64 at D <= 128: the check is not vacuous
    with pytest.raises(ValueError, match="short"):  # 128-row tiles spill on sm90: bucket 128 never fits
        plans.parse_entry(entry(seq_bucket="128", block_d=16, bwd=short))


def test_the_table_lookup_is_cached_per_device_and_directory(tmp_path, monkeypatch):
    """One file-name computation per (device, tiles dir), not three per attention call; another
    directory (or ``clear_table_cache``) reads again."""
    first, second = tmp_path / "a", tmp_path / "b"
    for directory, backend in ((first, "sdpa"), (second, "triton")):
        directory.mkdir()
        write_table(directory, [entry(auto={"fwd": backend, "fwd+bwd": backend})])
    slugs = []
    real_slug = plans.device_slug
    monkeypatch.setattr(plans, "device_slug", lambda name: slugs.append(name) or real_slug(name))
    monkeypatch.setenv("ADCLR_TILES_DIR", str(first))
    for _ in range(3):
        assert plans.auto_backend(FAKE_GPU, 207, 64, torch.bfloat16, PARAMS_207, "fwd") == "sdpa"
        plans.resolve_plan(207, 64, torch.bfloat16, PARAMS_207, FAKE_GPU)
    assert slugs == [FAKE_GPU]
    monkeypatch.setenv("ADCLR_TILES_DIR", str(second))
    assert plans.auto_backend(FAKE_GPU, 207, 64, torch.bfloat16, PARAMS_207, "fwd") == "triton"
    assert len(slugs) == 2
    write_table(second, [entry(auto={"fwd": "sdpa", "fwd+bwd": "sdpa"})])  # clears the cache
    assert plans.auto_backend(FAKE_GPU, 207, 64, torch.bfloat16, PARAMS_207, "fwd") == "sdpa"
    plans.clear_table_cache()


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
        (
            entry(bwd={"variant": "v1", "tiles": {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 1}}),
            "variant",
        ),
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
    """kernels/tiles/ holds its README and per-GPU tables only, each named after its device and valid
    entry by entry (the loader would skip a broken one with only a warning). The tuner's smoke test
    applies the same check to the table it writes."""
    names = sorted(os.listdir(plans.TILES_DIR))
    tables = [name for name in names if name.endswith(".json")]
    assert set(names) - set(tables) == {"README.md"}, names
    for name in tables:
        check_table_file(os.path.join(plans.TILES_DIR, name))


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda t: t["entries"].append(entry(mask="causal")), "mask"),
        (lambda t: t["entries"].append(dict(t["entries"][0])), "twice"),
        (lambda t: t.update(device="Another GPU"), "named after"),
        (lambda t: t.pop("triton"), "triton"),
        (lambda t: t.update(schema=2), "schema"),
    ],
)
def test_the_table_check_rejects_a_broken_table(change, why, tmp_path):
    table = {"schema": plans.TABLE_SCHEMA, "device": FAKE_GPU, "torch": "2", "triton": "3", "date": "d"}
    table["entries"] = [entry()]
    path = tmp_path / (plans.device_slug(FAKE_GPU) + ".json")
    path.write_text(json.dumps(table))
    check_table_file(str(path))  # the good table passes
    change(table)
    path.write_text(json.dumps(table))
    with pytest.raises(AssertionError, match=why):
        check_table_file(str(path))


@pytest.fixture
def fake_gpu(monkeypatch, tiles_dir):
    """``auto`` behaves as on an sm80+ GPU named FAKE_GPU (the tensors stay on CPU)."""
    monkeypatch.setattr(attention, "triton_is_default", lambda device: True)
    monkeypatch.setattr(attention.device, "table_key", lambda target: FAKE_GPU)
    return tiles_dir


def test_auto_picks_the_tuned_backend_per_mode(fake_gpu):
    write_table(fake_gpu, [entry(auto={"fwd": "sdpa", "fwd+bwd": "triton"})])
    layout = AttentionLayout(197, 10)
    t = torch.zeros(1, 1, 207, 64, dtype=torch.bfloat16)
    resolve = attention._resolve_backend
    assert resolve("auto", t, 64, 0.0, layout, needs_grad=False) == "sdpa"
    assert resolve("auto", t, 64, 0.0, layout, needs_grad=True) == "triton"
    # Reasons to leave the fused kernel whatever the table says: dropout, float64, huge head dims.
    assert resolve("auto", t, 64, 0.1, layout, needs_grad=False) == "sdpa"
    assert resolve("auto", t.double(), 64, 0.0, layout, needs_grad=False) == "sdpa"
    assert resolve("auto", t, 512, 0.0, layout, needs_grad=False) == "sdpa"
    assert resolve("triton", t, 64, 0.0, layout, needs_grad=False) == "triton"  # explicit choices stand


@pytest.mark.parametrize(
    "layout, head_dim, dtype, backend",
    [
        (AttentionLayout(197, 10), 64, torch.float16, "triton"),  # the ADCLR masks the tiles were sized for
        (AttentionLayout(37, 10, 1, "raw+self"), 32, torch.bfloat16, "triton"),
        (AttentionLayout(502, 10, 1, "raw"), 64, torch.bfloat16, "triton"),  # L = 512
        (AttentionLayout(785, 10, 1, "raw"), 64, torch.bfloat16, ("triton", "sdpa")),  # ViT-S/8: bwd not measured
        (AttentionLayout(197, 0), 64, torch.bfloat16, "sdpa"),  # no query tokens: the full mask
        (AttentionLayout(37, 0), 64, torch.float16, "sdpa"),  # a local crop without query tokens
        (AttentionLayout(197, 10, bidirectional=True), 64, torch.bfloat16, "sdpa"),
        (AttentionLayout(197, 10), 80, torch.bfloat16, "sdpa"),  # padded head dim 128
        (AttentionLayout(197, 10), 128, torch.float16, "sdpa"),
        (AttentionLayout(197, 10), 64, torch.float32, "sdpa"),
    ],
)
def test_auto_without_a_table_entry(layout, head_dim, dtype, backend, fake_gpu):
    """Untuned: ours only where the built-in tiles were sized, and for forward + backward only up to
    L = 512; SDPA elsewhere. ``backend`` is one name for both modes or (forward, forward + backward).
    ``triton`` still forces ours."""
    t = torch.zeros(1, 1, layout.length, head_dim, dtype=dtype)
    expected = backend if isinstance(backend, tuple) else (backend, backend)
    for needs_grad in (False, True):
        assert attention._resolve_backend("auto", t, head_dim, 0.0, layout, needs_grad) == expected[needs_grad]
        assert attention._resolve_backend("triton", t, head_dim, 0.0, layout, needs_grad) == "triton"


@pytest.mark.parametrize(
    "layout, head_dim, dtype, key",
    [
        (AttentionLayout(197, 0), 64, torch.bfloat16, plans.ShapeKey(64, "256", "bf16", "full")),
        (AttentionLayout(197, 10), 128, torch.float16, plans.ShapeKey(128, "256", "fp16", "prefix+raw")),
        (AttentionLayout(197, 10), 64, torch.float32, plans.ShapeKey(64, "256", "fp32", "prefix+raw")),
    ],
)
def test_a_table_entry_can_send_auto_to_ours_where_the_default_is_sdpa(layout, head_dim, dtype, key, fake_gpu):
    fields = {"block_d": key.block_d, "seq_bucket": key.seq_bucket, "dtype": key.dtype, "mask": key.mask}
    write_table(fake_gpu, [entry(**fields, auto={"fwd": "triton", "fwd+bwd": "sdpa"})])
    t = torch.zeros(1, 1, layout.length, head_dim, dtype=dtype)
    assert attention._resolve_backend("auto", t, head_dim, 0.0, layout, needs_grad=False) == "triton"
    assert attention._resolve_backend("auto", t, head_dim, 0.0, layout, needs_grad=True) == "sdpa"


@pytest.mark.parametrize(
    "layout, table, runs_sdpa",
    [
        (AttentionLayout(37, 10), "sdpa", True),  # the table measured SDPA faster for this key
        (AttentionLayout(37, 10), None, False),  # untuned ADCLR mask: ours
        (AttentionLayout(47, 0), None, True),  # untuned full mask: SDPA
    ],
)
def test_auto_end_to_end_follows_the_table(layout, table, runs_sdpa, fake_gpu):
    """The same call runs SDPA or ours as decided (both compute the layout's function)."""
    if table:
        write_table(
            fake_gpu,
            [entry(seq_bucket="64", dtype="fp16", mask="prefix+raw", auto={"fwd": table} | {"fwd+bwd": table})],
        )
    q, k, v = (torch.randn(1, 2, 47, 64, dtype=torch.float16) for _ in range(3))
    calls = []
    original = attention.sdpa_attention
    attention.sdpa_attention = lambda *a: calls.append(1) or original(*a)
    try:
        out = adclr_attention(q, k, v, layout)
    finally:
        attention.sdpa_attention = original
    assert bool(calls) == runs_sdpa
    truth = adclr_attention(q.double(), k.double(), v.double(), layout, backend="reference")
    assert max_error(out, truth) < 2e-3


def test_v2_grid_size():
    """One axis of blocks x B*H programs (the forward; twice that for the fused backward)."""
    q = torch.zeros(3, 5, 207, 64, dtype=torch.float16)
    o, o_view, lse = ops.forward_outputs(q, seq_major=False)
    plan = plans.default_plan(207, 64, torch.float16)
    (launch,) = ops.forward_launches(q, q, q, o_view, lse, PARAMS_207, 0.125, plan, (9, 0))
    assert launch.grid({"BLOCK_M": 64}) == (4 * 15,)
    grads, (dq, dk, dv) = ops.gradient_outputs(q, seq_major=False)
    (fused,) = ops.backward_launches(q, q, q, q, o_view, lse, dq, dk, dv, PARAMS_207, 0.125, plan, (9, 0))
    assert fused.grid({"BLOCK_OWN": 64}) == (2 * 4 * 15,)


def _rows_written(t: torch.Tensor) -> torch.Tensor:
    """``[B*H, L]``: which rows of a NaN-poisoned ``[B, H, L, D]`` output some program wrote."""
    return ~t.isnan().all(-1).flatten(0, 1)


def test_v2_programs_take_the_sequence_block_fastest():
    """pid -> (block, head) with the block fastest, read off which rows the first programs write (in
    the interpreter, on a grid cut short): the forward's program p writes rows of block p % n of
    head p // n; the fused backward's program p of head p // 2n owns key block p % 2n (dK, dV) when
    that is < n, else row block p % 2n - n (dQ)."""
    B, H, L, D, block = 1, 3, 70, 16, 32
    n = -(-L // block)  # blocks per head
    layout = AttentionLayout(60, 10)
    q, k, v, do = (torch.randn(B, H, L, D) for _ in range(4))
    tiles = plans.Tiles(block, block, 1, 1)
    plan = plans.Plan("v2", tiles, "fused", tiles)
    params, scale = layout.kernel_params, D**-0.5

    def expected(programs: int, owner) -> torch.Tensor:
        rows = torch.zeros(B * H, L, dtype=torch.bool)
        for pid in range(programs):
            head_and_block = owner(pid)
            if head_and_block is not None:
                rows[head_and_block[0], head_and_block[1] * block : (head_and_block[1] + 1) * block] = True
        return rows

    for programs in (1, n, n + 1):
        o, lse = torch.full_like(q, float("nan")), torch.full((B * H, L), float("nan"))
        (launch,) = ops.forward_launches(q, k, v, o, lse, params, scale, plan, None)
        dataclasses.replace(launch, grid=(programs,))()
        assert torch.equal(_rows_written(o), expected(programs, lambda p: divmod(p, n)))

    o, lse = torch.empty_like(q), torch.empty(B * H, L)
    for launch in ops.forward_launches(q, k, v, o, lse, params, scale, plan, None):
        launch()
    for programs in (n, 2 * n, 2 * n + 1):
        dq, dk, dv = (torch.full_like(q, float("nan")) for _ in range(3))
        (launch,) = ops.backward_launches(do, q, k, v, o, lse, dq, dk, dv, params, scale, plan, None)
        dataclasses.replace(launch, grid=(programs,))()
        key_blocks = expected(programs, lambda p: (p // (2 * n), p % (2 * n)) if p % (2 * n) < n else None)
        row_blocks = expected(programs, lambda p: (p // (2 * n), p % (2 * n) - n) if p % (2 * n) >= n else None)
        assert torch.equal(_rows_written(dk), key_blocks) and torch.equal(_rows_written(dv), key_blocks)
        assert torch.equal(_rows_written(dq), row_blocks)


def test_launches_run_with_the_inputs_device_current(monkeypatch):
    """Triton launches on the current CUDA device, not on the tensors': each launch of a call on a
    fake second GPU (cuda:1 while cuda:0 is current) must run with cuda:1 current, and cuda:0 must be
    current again afterwards. ``_forward`` and ``_backward`` must hand their inputs' device over."""
    current = [torch.device("cuda", 0)]

    class FakeDeviceGuard:  # stands in for torch.cuda.device: no CUDA needed
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            self.previous, current[0] = current[0], self.device

        def __exit__(self, *exc):
            current[0] = self.previous

    monkeypatch.setattr(torch.cuda, "device", FakeDeviceGuard)
    seen = []
    ops.run_launches([lambda: seen.append(current[0])] * 2, torch.device("cuda", 1))
    assert seen == [torch.device("cuda", 1)] * 2 and current[0] == torch.device("cuda", 0)

    handed = []
    monkeypatch.setattr(ops, "run_launches", lambda launches, device: handed.append((launches[0].name, device)))
    q = torch.zeros(1, 2, 47, 16)
    params = AttentionLayout(37, 10).kernel_params
    o, o_view, lse = ops.forward_outputs(q, seq_major=False)
    ops._forward(q, q, q, o_view, lse, *params, 0.25)
    _, (dq, dk, dv) = ops.gradient_outputs(q, seq_major=False)
    ops._backward(q, q, q, q, o_view, lse, dq, dk, dv, *params, 0.25)
    assert [device for _, device in handed] == [q.device, q.device]


def test_the_per_call_plan_cache_sees_tables_forced_plans_and_autotune(tiles_dir, monkeypatch):
    """Each call's plan is decided once per shape key and cached; the cache must still follow a table
    read afresh, a forced plan entered and ADCLR_AUTOTUNE set between two identical calls."""
    monkeypatch.setattr(ops, "_interpreting", lambda t: False)  # as on a GPU named FAKE_GPU
    monkeypatch.setattr(device, "_name", lambda index: FAKE_GPU)
    monkeypatch.setattr(device, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    q = torch.zeros(1, 2, 207, 64, dtype=torch.bfloat16)
    assert ops._call_context(q, PARAMS_207) == (plans.default_plan(207, 64, torch.bfloat16), (9, 0))
    write_table(tiles_dir, [entry()])
    assert ops._call_context(q, PARAMS_207)[0] == plans.Plan("v2", T(128, 32, 4, 3), "fused", T(32, 32, 4, 3))
    forced = plans.Plan("v2", T(32, 64, 4, 2), "fused", T(64, 64, 4, 2))
    with plans.forced_plan(forced):
        assert ops._call_context(q, PARAMS_207)[0] == forced
    monkeypatch.setenv("ADCLR_AUTOTUNE", "1")
    assert ops._call_context(q, PARAMS_207)[0].fwd_tiles is None


@pytest.fixture
def fresh_device_caches():
    """Empty per-device caches before and after (a fake driver's answers must not outlive the test)."""
    caches = (device._capability, device._name, device._fused_kernel_supported)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def test_the_device_facts_come_from_one_module_asked_once_per_device(monkeypatch, fresh_device_caches):
    """The bf16 rule (sm80+, CPUs run it), the fused kernel's rule (sm80+), and the driver asked once
    per device index for name and capability. Catches a rule written with ``>`` (sm80 refused) or a
    copy that asks the driver on every call."""
    assert [device.supports_bf16(c) for c in ((7, 0), (7, 5), (8, 0), (8, 6), (9, 0), None)] == [
        False,
        False,
        True,
        True,
        True,
        True,
    ]
    assert device.capability("cpu") is None and device.name("cpu") == "CPU (Triton interpreter)"
    asked = []
    gpus = {1: ("Old GPU", (7, 5)), 2: ("New GPU", (8, 0))}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: asked.append(i) or gpus[i][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: asked.append(i) or gpus[i][1])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for _ in range(3):
        assert device.capability(torch.device("cuda", 1)) == (7, 5) and device.table_key("cuda:1") == "Old GPU"
        assert not device.fused_kernel_supported(torch.device("cuda", 1))
        assert device.fused_kernel_supported(torch.device("cuda", 2))
    assert sorted(asked) == [1, 1, 2]
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read at call time: the interpreter never takes CUDA tensors
    assert not device.fused_kernel_supported(torch.device("cuda", 2))
