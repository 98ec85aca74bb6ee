"""Every benchmark runs on CPU with tiny shapes (no timing assertions), so a broken one is caught in CI."""

import csv
import math
import time

import pytest

from adclr.kernels import triton_attention
from bench import attention, overhead, report, train_step

pytestmark = pytest.mark.slow


def test_attention_benchmark_runs_every_provider_and_writes_its_files(tmp_path, capsys):
    """Under the interpreter without --tiny it switches to the tiny shapes (saying so)."""
    attention.main(["--device", "cpu", "--rules", "raw", "prefix+raw+self", "--output_dir", str(tmp_path)])
    assert "running the --tiny shapes" in capsys.readouterr().out
    for name in ("attention.md", "attention.csv", "attention.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(tmp_path / "attention.csv")))
    providers = {r["provider"] for r in rows}
    assert {"ours", "paper", "sdpa_mask", "sdpa_sliced", "full_sdpa", "flex_eager"} <= providers
    assert {r["shape"] for r in rows} == {"tiny"} and {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        assert float(r["ms"]) > 0 and r["device"].startswith("CPU")
        if r["provider"] != "full_sdpa":
            assert float(r["max_err"]) < 1e-4, r  # every provider computes the layout's function
    assert not any(r["provider"] == "sdpa_sliced" and r["rule"] == "prefix+raw+self" for r in rows)
    assert rows[-1]["provider"] == "flex_eager"  # flex is timed after every other provider of every case
    assert "xformers" in (tmp_path / "attention.md").read_text()  # skipped with a note when missing


def test_attention_benchmark_keeps_the_cases_it_finished(tmp_path, monkeypatch):
    """The table is rewritten after every case: a run that dies in its second case keeps the first."""
    calls = []

    def dies_in_second_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real_run_case(*args, **kwargs)

    real_run_case = attention.run_case
    monkeypatch.setattr(attention, "run_case", dies_in_second_case)
    with pytest.raises(RuntimeError, match="killed"):
        attention.main(
            ["--device", "cpu", "--tiny", "--rules", "raw", "raw+self", "--modes", "fwd", "--output_dir", str(tmp_path)]
        )
    rows = list(csv.DictReader(open(tmp_path / "attention.csv")))
    assert rows and {r["rule"] for r in rows} == {"raw"}


def test_attention_benchmark_on_cpu_names_the_interpreter_command(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1 python -m bench.attention --device cpu --tiny"):
        attention.main(["--device", "cpu"])


def test_train_step_benchmark_runs_every_variant(tmp_path):
    train_step.main(["--device", "cpu", "--tiny", "--steps", "1", "--output_dir", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "train_step.csv")))
    assert [r["variant"] for r in rows] == list(train_step.VARIANTS)
    assert all(float(r["step_ms"]) > 0 and math.isclose(float(rows[0]["time_vs_dino"]), 1.0) for r in rows)
    assert [int(r["Q"]) for r in rows] == [0, 0, 4, 4, 4, 4]
    assert [r["fused_loss"] for r in rows] == ["False", "True", "False", "True", "False", "False"]


def test_learning_benchmark_writes_its_table_and_picture(tmp_path):
    """Two seeds of ADCLR and DINO (tiny runs, two at a time): a table of every method with mean ± std, the
    paired difference, the per-epoch picture, and every run's log; DINO's runs have no query loss."""
    import json

    from bench import learning

    learning.main(["--tiny", "--seeds", "0", "1", "--eval_every", "1", "--jobs", "2", "--output_dir", str(tmp_path)])
    table = (tmp_path / "learning.md").read_text()
    for method in ("adclr", "dino", "random_init"):
        assert f"| {method} | " in table
    assert "ADCLR − DINO, paired by seed" in table and table.count("±") >= 9
    assert (tmp_path / "learning.png").stat().st_size > 0
    report = json.loads((tmp_path / "learning.json").read_text())
    for method in ("adclr", "dino"):
        for seed in ("0", "1"):
            rows = report["runs"][method][seed]
            assert [r["epoch"] for r in rows] == [1, 2] and all("dense_miou_teacher" in r for r in rows)
            assert ("query_entropy" in rows[-1]) == (method == "adclr")
    knn = report["final"]["knn_top1"]
    difference = knn["adclr"]["0"] - knn["dino"]["0"] + knn["adclr"]["1"] - knn["dino"]["1"]
    assert math.isclose(report["final"]["knn_top1"]["difference"]["mean"], difference / 2)


def test_overhead_benchmark_stubs_the_launches_and_puts_them_back(capsys):
    """Both modes are timed with ``Launch.__call__`` a no-op (no kernel runs: a call costs
    microseconds, where the interpreter would take seconds), and the real launch is restored."""
    real = triton_attention.Launch.__call__
    overhead.main(["--repeats", "3", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    times = {line.split()[0]: float(line.split()[1]) for line in lines[1:]}
    assert set(times) == {"fwd", "fwd+bwd"} and all(0 < us < 1e4 for us in times.values())
    assert triton_attention.Launch.__call__ is real


def test_attention_benchmark_reports_gpu_time_and_python_cost(tmp_path, monkeypatch):
    """A fake CUDA-graph capture on CPU (replays take 0.5 ms; the ``paper`` provider cannot be captured):
    every row has the GPU time (``ms``, from the replays), the eager time and the Python cost between
    them; the provider that failed capture keeps its eager time, marked so, and the run goes on; the
    summary names ours' Python cost. Catches rows that report eager time as GPU time, a capture failure
    that ends the run, and a report without the second column."""
    from bench import common, providers

    class FakeGraph:
        def replay(self):
            time.sleep(0.0005)

    called = []
    real_paper = providers.paper_attention
    monkeypatch.setattr(providers, "paper_attention", lambda *args: called.append(1) or real_paper(*args))

    def fake_capture(fn, device, grad_to_none=None):
        called.clear()
        fn()
        if called:
            raise RuntimeError("capture not supported")
        return FakeGraph()

    monkeypatch.setattr(common, "capture_graph", fake_capture)
    args = ["--device", "cpu", "--tiny", "--rules", "raw", "--no_flex", "--output_dir", str(tmp_path)]
    attention.main(args)
    rows = list(csv.DictReader(open(tmp_path / "attention.csv")))
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        ms, eager = float(r["ms"]), float(r["eager_ms"])
        if r["provider"] == "paper":
            assert r["timing"] == "eager (capture failed: RuntimeError: capture not supported)"
            assert ms == eager and math.isnan(float(r["python_ms"]))
        else:
            assert r["timing"] == "graph" and 0.5 <= ms < 5, r  # the replays' time, not the eager one
            assert math.isclose(float(r["python_ms"]), eager - ms)
    ours = next(r for r in rows if r["provider"] == "ours" and r["mode"] == "fwd+bwd")
    assert float(ours["eager_ms"]) > 10 * float(ours["ms"])  # the interpreter: the eager call is far slower
    header = (tmp_path / "attention.md").read_text()
    assert "| ms | eager_ms | python_ms | timing |" in header
    summary = "\n".join(report.attention_summary(rows))
    assert "ours' Python cost per call (eager - graph, ms): tiny raw fp32 fwd" in summary


@pytest.mark.parametrize("path", ["model", "floor"])
def test_overhead_benchmark_times_the_model_path_and_the_floor(path, capsys):
    """``--path model`` times what ``adclr.model`` calls, ``--path floor`` an empty autograd function;
    both with the launches stubbed (a launch that ran would take the interpreter seconds per call)."""
    real = triton_attention.Launch.__call__
    overhead.main(["--path", path, "--repeats", "3", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{path} path per call")
    times = {line.split()[0]: float(line.split()[1]) for line in lines[1:]}
    assert set(times) == {"fwd", "fwd+bwd"} and all(0 < us < 1e4 for us in times.values())
    assert triton_attention.Launch.__call__ is real
