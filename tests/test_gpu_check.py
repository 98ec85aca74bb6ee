"""bench/gpu_check.sh without a GPU: its stage list and budget (``--dry-run``) and the summary it
prints last, run on fake result files."""

import csv
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from bench import report, versions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
STAGES = ["versions", "install", "precompile", "benchmark", "tune", "gpu_tests", "train_step", "summary"]


def run_script(out, *args, **kwargs):
    """The script with this interpreter (``PYTHON``), its results to ``out`` (``OUT``)."""
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, **kwargs)


def unpacked(out, tmp_path):
    """The archive's ``gpu_check/`` folder, unpacked; ``out`` must hold exactly the archive and the summary."""
    assert sorted(os.listdir(out)) == ["gpu_check.tar.gz", "summary.txt"]
    with tarfile.open(out / "gpu_check.tar.gz") as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    return tmp_path / "unpacked" / "gpu_check"


def test_dry_run_prints_a_budget_within_400_s_and_returns_an_archive_and_a_summary(tmp_path):
    out = tmp_path / "out"
    result = run_script(out, "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith(f"interpreter: {sys.executable}")
    table = [line for line in lines[2:-1]]
    names = [line[:11].strip() for line in table]
    assert names == ["preamble", *STAGES, "kill grace", "archive"]
    budgets = [int(line[11:].split()[0]) for line in table]
    assert sum(budgets) <= 400 and lines[-1] == f"total: {sum(budgets)} s of 400 s"
    assert budgets[names.index("kill grace")] == 2 * len(STAGES)  # timeout -k 2 on every stage
    commands = {n: line.split(" s  ", 1)[1] for n, line in zip(names, table) if n in STAGES}
    budget = dict(zip(names, budgets))
    assert "--modes fwd fwd+bwd" in commands["benchmark"] and "--output_dir" in commands["benchmark"]
    # A flex case (a compile) started just before --budget_s must still end inside the stage.
    assert budget["benchmark"] - float(commands["benchmark"].split("--budget_s ")[1].split()[0]) >= 30
    assert "--precompile_only" in commands["precompile"] and "--budget_s" in commands["tune"]
    assert "hidden_keys" in commands["gpu_tests"] and "-m bench.versions" in commands["versions"]
    # Offline: no index, no pip self-version check; the package's build backend is the installed one.
    assert all(
        flag in commands["install"] for flag in ("--no-index", "--disable-pip-version-check", "--no-build-isolation")
    )
    assert all(command.startswith(sys.executable) for command in commands.values())  # PYTHON, not PATH's python3
    # Every variant but the slow reference one, dino first (the ratios are to it).
    assert (
        "-m bench.train_step --steps 10 --variants dino triton_fused triton dino_fused sdpa" in commands["train_step"]
    )
    work = unpacked(out, tmp_path)
    assert [line.split()[:2] for line in (work / "stages.txt").read_text().splitlines()] == [
        [name, "dry-run"] for name in STAGES
    ]
    assert (work / "budget.txt").read_text().splitlines()[-1] == lines[-1]
    assert (out / "summary.txt").read_text().startswith("gpu_check dry run")


def test_bad_arguments_are_refused_in_one_line(tmp_path):
    for args in (["--wheels", str(tmp_path / "missing")], ["--bogus"]):
        result = run_script(tmp_path / "out", *args)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


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
    """Two real stages on CPU: ``versions`` fails (no CUDA), ``summary`` still runs and prints last;
    the stage logs come back inside the archive."""
    out = tmp_path / "out"
    result = run_script(out, "--only", "versions", "summary")
    assert result.returncode == 1  # a stage failed
    assert "versions: start (budget 15 s)" in result.stdout  # each stage's start and elapsed time
    work = unpacked(out, tmp_path)
    stages = (work / "stages.txt").read_text().splitlines()
    assert [line.split()[:2] for line in stages] == [["versions", "FAILED"], ["summary", "ok"]]
    assert "no CUDA device visible" in (work / "versions.log").read_text()  # the full log of the failed stage
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[-1] == f"archive: {out}/gpu_check.tar.gz (unpacks to gpu_check/)"
    assert summary[-2].startswith("full logs and tables: ")  # the report's own last line
    assert result.stdout.strip().endswith("\n".join(summary[:-1]))  # the summary is printed last


@pytest.mark.slow
def test_a_run_killed_mid_stage_still_returns_its_archive_and_summary(tmp_path):
    """SIGTERM to the script while a stage runs (as a time limit would): the trap stops the stage,
    records it as cut short, and leaves the archive and a summary that says so."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    process = subprocess.Popen(
        ["bash", SCRIPT, "--only", "gpu_tests", "summary"], stdout=subprocess.PIPE, text=True, env=env
    )
    time.sleep(5)  # pytest is collecting or running the interpreter's hidden-key cases by now
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=30)
    assert process.returncode == 143
    work = unpacked(out, tmp_path)
    assert (work / "stages.txt").read_text().split()[:2] == ["gpu_tests", "CUT_SHORT"]
    assert (work / "gpu_tests.log").exists()
    summary = (out / "summary.txt").read_text()
    assert summary.startswith("gpu_check cut short at +") and "during stage gpu_tests" in summary
    assert summary in stdout


def test_versions_installs_only_what_is_missing_or_too_old_from_the_wheels(tmp_path, monkeypatch, capsys):
    """``bench.versions``: timm below 1.0.23 and triton missing are installed from the folder (and only
    they); the line says where each package came from; without a folder it fails naming them."""
    present = {"torch": "2.9.0", "timm": "1.0.20", "pytest": "8.0"}
    monkeypatch.setattr(versions, "installed", lambda name: present.get(name))
    asked = []

    def fake_install(specs, wheels):
        asked.append((specs, wheels))
        present.update(triton="3.6.0", timm="1.0.23")
        return 0

    monkeypatch.setattr(versions, "install_from_wheels", fake_install)
    assert versions.main(["--no_device"]) == 1
    assert "UNMET: triton, timm; pass --wheels DIR" in capsys.readouterr().out and not asked
    assert versions.main(["--wheels", str(tmp_path), "--no_device"]) == 0
    assert asked == [(["triton>=3.6", "timm>=1.0.23"], str(tmp_path))]
    line = capsys.readouterr().out.strip()
    assert line == (
        f"versions: torch 2.9.0 (image), triton 3.6.0 (wheels {tmp_path}), timm 1.0.23 (wheels {tmp_path}), "
        "pytest 8.0 (image)"
    )
    assert versions.parse_version("3.6.0+git1a2b") == (3, 6, 0) and versions.parse_version("1.0.3rc1") == (1, 0, 3)
