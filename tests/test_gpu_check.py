"""bench/gpu_check.sh without a GPU: its stage list and budget (``--dry-run``) and the summary it
prints last, run on fake result files."""

import csv
import os
import subprocess

from bench import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["install", "versions", "precompile", "benchmark", "tune", "gpu_tests", "train_step", "summary"]


def test_dry_run_lists_every_stage_within_seven_minutes(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env={**os.environ, "OUT": str(out)},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    stages = [line.split()[0] for line in lines[1:-1]]
    assert stages == STAGES
    budgets = [int(line.split()[1]) for line in lines[1:-1]]
    assert sum(budgets) + 2 * len(budgets) <= 420 and lines[-1] == f"total: {sum(budgets)} s of 420 s"
    commands = dict(zip(stages, (line.split(" s  ", 1)[1] for line in lines[1:-1])))
    budget = dict(zip(stages, budgets))
    assert "--modes fwd fwd+bwd" in commands["benchmark"] and f"--output_dir '{out}'" in commands["benchmark"]
    # A flex case (a compile) started just before --budget_s must still end inside the stage.
    assert budget["benchmark"] - float(commands["benchmark"].split("--budget_s ")[1].split()[0]) >= 30
    assert "--precompile_only" in commands["precompile"] and "--budget_s" in commands["tune"]
    assert "-k 'gpu or fp32_attention or head_dims'" in commands["gpu_tests"]
    # Offline: no index, no pip self-version check; the package's build backend is the installed one.
    assert all(
        flag in commands["install"] for flag in ("--no-index", "--disable-pip-version-check", "--no-build-isolation")
    )
    # Every variant but the slow reference one, dino first (the ratios are to it).
    variants = "--variants dino triton_fused triton dino_fused sdpa"
    assert commands["train_step"].endswith(f"-m bench.train_step --steps 10 {variants} --output_dir '{out}'")
    assert not out.exists()  # a dry run writes nothing


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_summary_of_a_fake_run(tmp_path):
    stamp = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "date": "today"}
    case = {"shape": "vit_s16_global", "rule": "prefix+raw", "dtype": "bf16", "mode": "fwd+bwd"}
    timings = {"ours": (0.25, 100), "full_sdpa": (0.2, 90), "sdpa_sliced": (0.5, 150), "flex": (0.7, 80)}
    rows = [stamp | case | {"provider": p, "ms": ms, "peak_mib": mib} for p, (ms, mib) in timings.items()]
    _write_csv(tmp_path / "attention.csv", rows)
    tune_row = {"block_d": 64, "seq_bucket": "256", "dtype": "bf16", "mask": "prefix+raw", "status": "ok"}
    _write_csv(
        tmp_path / "tune.csv",
        [
            tune_row | {"stage": "e2e fwd", "candidate": "sdpa", "ms": 0.1},
            tune_row | {"stage": "e2e fwd", "candidate": "ours: v2 64x64 w4 s2 / fused 64x32 w4 s2", "ms": 0.05},
            tune_row | {"stage": "e2e fwd+bwd", "candidate": "sdpa", "ms": 0.5},
            tune_row | {"stage": "e2e fwd+bwd", "candidate": "ours: v2 64x64 w4 s2 / fused 64x32 w4 s2", "ms": 0.25},
            tune_row | {"stage": "bwd", "candidate": "short w8 s1", "ms": "nan", "status": "inexact"},
        ],
    )
    (tmp_path / "gpu_tests.log").write_text("....F\nFAILED x\n===== 150 passed, 1 failed in 61.2s =====\n")
    _write_csv(
        tmp_path / "train_step.csv",
        [{"variant": "dino", "step_ms": 100.0, "time_vs_dino": 1.0, "memory_vs_dino": 1.0}],
    )
    (tmp_path / "stages.txt").write_text("install ok 9/20 s\ntune TIMEOUT 85/85 s\n")
    text = report.summarize(str(tmp_path))
    lines = text.splitlines()
    assert lines[0] == "NVIDIA H100 80GB HBM3; torch 2.11.0; triton 3.6.0; today"
    assert "tune TIMEOUT 85/85 s" in text
    row = next(line for line in lines if line.startswith("vit_s16_global"))
    # ours/full = 1.25; the fastest exact peer is sdpa_sliced at 2x ours; memory ours/SDPA 100/150.
    assert row.split()[4:] == ["0.250", "0.200", "1.25", "sdpa_sliced", "0.500", "2.00", "100/150"]
    tune_line = next(line for line in lines if line.startswith(" 64"))
    assert tune_line.split()[4:6] == ["0.50", "0.50"] and "fused 64x32 w4 s2" in tune_line
    assert "bwd short w8 s1" in text  # the inexact candidate is named
    assert "GPU tests: 150 passed, 1 failed in 61.2s" in text
    assert "train step dino" in text and text.endswith(f"full logs and tables: {tmp_path}")


def test_summary_of_a_test_stage_cut_short(tmp_path):
    (tmp_path / "gpu_tests.log").write_text(
        "[gw0] [ 1%] PASSED tests/t.py::test_a\n[gw1] [ 2%] FAILED tests/t.py::test_b[x]\n"
        "[gw0] [ 3%] PASSED tests/t.py::test_c\n"
    )
    assert report.pytest_summary(str(tmp_path / "gpu_tests.log")) == (
        "GPU tests (cut short): 2 passed, 1 failed, 0 errors; failed: tests/t.py::test_b[x]"
    )


def test_summary_of_an_empty_run(tmp_path):
    text = report.summarize(str(tmp_path))
    assert "kernel benchmark: no results" in text and "tuner: no results" in text and "GPU tests: no log" in text


def test_stages_run_under_the_runner_and_a_failure_does_not_stop_the_rest(tmp_path):
    """Two real stages on CPU: ``versions`` fails (no CUDA), ``summary`` still runs and prints last."""
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--only", "versions", "summary"],
        capture_output=True,
        text=True,
        env={**os.environ, "OUT": str(out)},
    )
    assert result.returncode == 1  # a stage failed
    stages = (out / "stages.txt").read_text().splitlines()
    assert [line.split()[:2] for line in stages] == [["versions", "FAILED"], ["summary", "ok"]]
    assert (out / "versions.log").stat().st_size > 0  # the full log of the failed stage
    assert result.stdout.strip().splitlines()[-1] == f"full logs and tables: {out}"  # the summary is last
    assert (out / "summary.txt").read_text() in result.stdout
