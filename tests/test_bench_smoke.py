"""Every benchmark runs on CPU with tiny shapes (no timing assertions), so a broken one is caught in CI."""

import csv
import math

import pytest

from bench import attention, train_step

pytestmark = pytest.mark.slow


def test_attention_benchmark_runs_every_provider_and_writes_its_files(tmp_path):
    attention.main(["--device", "cpu", "--tiny", "--rules", "raw", "prefix+raw+self", "--output_dir", str(tmp_path)])
    for name in ("attention.md", "attention.csv", "attention.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(tmp_path / "attention.csv")))
    providers = {r["provider"] for r in rows}
    assert {"ours", "paper", "sdpa_mask", "sdpa_sliced", "full_sdpa"} <= providers
    for r in rows:
        assert float(r["ms"]) > 0 and r["device"].startswith("CPU")
        if r["provider"] != "full_sdpa":
            assert float(r["max_err"]) < 1e-4, r  # every provider computes the layout's function
    assert not any(r["provider"] == "sdpa_sliced" and r["rule"] == "prefix+raw+self" for r in rows)
    assert "xformers" in (tmp_path / "attention.md").read_text()  # skipped with a note when missing


def test_train_step_benchmark_runs_every_variant(tmp_path):
    train_step.main(["--device", "cpu", "--tiny", "--steps", "1", "--output_dir", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "train_step.csv")))
    assert [r["variant"] for r in rows] == list(train_step.VARIANTS)
    assert all(float(r["step_ms"]) > 0 and math.isclose(float(rows[0]["time_vs_dino"]), 1.0) for r in rows)
    assert [int(r["Q"]) for r in rows] == [0, 0, 4, 4, 4, 4]
    assert [r["fused_loss"] for r in rows] == ["False", "True", "False", "True", "False", "False"]
