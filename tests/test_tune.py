"""The tuner: a CPU smoke run of ``python -m bench.tune`` (interpreter, tiny shapes, the same code path
as on a GPU: precompile pool, exactness gate, timing, table) and its decision logic."""

import csv
import json
import math
import time
import warnings

import pytest
import torch
from attention_utils import check_table_file

from adclr.kernels import AttentionLayout, plans
from bench import report, tune

T = plans.Tiles


@pytest.mark.slow
def test_tune_smoke_run_writes_a_table_the_launcher_reads(tmp_path, monkeypatch):
    table_dir, out = tmp_path / "tiles", tmp_path / "out"
    args = ["--device", "cpu", "--tiny", "--rules", "raw+self", "--jobs", "2"]
    tune.main([*args, "--table_dir", str(table_dir), "--output_dir", str(out)])
    device = "CPU (Triton interpreter)"
    path = table_dir / (plans.device_slug(device) + ".json")
    check_table_file(str(path))  # named after the device, stamped, every entry valid
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no invalid entry
        table = plans.load_table(str(path))
    plans.clear_table_cache()
    assert set(table) == {plans.ShapeKey(16, "64", "fp32", "raw+self"), plans.ShapeKey(16, "128", "fp32", "raw+self")}
    rows = list(csv.DictReader(open(out / "tune.csv")))
    for name, (batch, heads, R, Q, D) in tune.TINY_SHAPES.items():
        case = tune.Case(name, batch, heads, R, Q, D, "raw+self", "fp32")
        measured = {r["candidate"] for r in rows if r["shape"] == name and r["stage"] in ("fwd", "bwd")}
        assert measured == {c.label() for c in tune.candidates(case, tiny=True)}
        assert {r["stage"] for r in rows if r["shape"] == name} == {"fwd", "bwd", "e2e fwd", "e2e fwd+bwd"}
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 for r in rows)
    assert (out / "tune.md").read_text().count("raw+self") == 2
    assert (out / "tiles" / path.name).read_text() == path.read_text()

    # The launcher picks the table's variants for this "device".
    monkeypatch.setenv("ADCLR_TILES_DIR", str(table_dir))
    params = AttentionLayout(37, 10, 1, "raw+self").kernel_params
    entry = table[plans.ShapeKey(16, "64", "fp32", "raw+self")]
    resolved = plans.resolve_plan(47, 16, torch.float32, params, device)
    plans.clear_table_cache()
    assert resolved == plans.Plan(entry.fwd, entry.fwd_tiles, entry.bwd, entry.bwd_tiles)


def test_tune_refuses_gpu_work_in_the_interpreter(monkeypatch):
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1 python -m bench.tune --device cpu --tiny"):
        tune.main(["--device", "cpu"])
    with pytest.raises(SystemExit, match="unset TRITON_INTERPRET"):
        tune.main(["--device", "cuda"])


def test_candidates_at_vit_lengths():
    short = tune.Case("local", 512, 6, 37, 10, 64, "prefix+raw", "bf16")
    long = tune.Case("s8", 32, 6, 785, 10, 64, "prefix+raw", "bf16")
    short_candidates, long_candidates = tune.candidates(short, False), tune.candidates(long, False)
    assert {c.variant for c in short_candidates if c.direction == "bwd"} == {"fused", "short"}
    assert {c.variant for c in long_candidates if c.direction == "bwd"} == {"fused"}  # 795 rows: no one tile
    assert all(c.tiles.block_m <= 64 for c in short_candidates)  # L = 47
    # The defaults are among the candidates, so the tuner can only match or beat them.
    for case in (short, long):
        default = plans.default_plan(case.layout.length, 64, torch.bfloat16)
        labels = {c.label() for c in tune.candidates(case, False)}
        assert tune.Candidate("fwd", "v2", default.fwd_tiles).label() in labels
        assert tune.Candidate("bwd", default.bwd, default.bwd_tiles).label() in labels


def test_the_key_plan_sums_over_shapes_and_skips_candidates_not_exact_everywhere():
    a, b = tune.Candidate("fwd", "v2", T(64, 64, 4, 2)), tune.Candidate("fwd", "v2", T(128, 64, 8, 3))
    f, s = tune.Candidate("bwd", "fused", T(64, 32, 4, 2)), tune.Candidate("bwd", "fused", T(128, 32, 8, 2))
    # b is fastest on the first shape but was inexact on the second; a wins on the sum.
    measured = [{"fwd": {a: 1.0, b: 0.5}, "bwd": {f: 2.0, s: 1.9}}, {"fwd": {a: 1.0}, "bwd": {f: 2.0, s: 2.5}}]
    assert tune.choose_plan(measured) == (a, f)  # f: 4.0 in all, s: 4.4
    assert tune.choose_plan([{"fwd": {}, "bwd": {f: 1.0}}]) is None  # no exact forward: no entry

    key = plans.ShapeKey(64, "256", "bf16", "prefix+raw")
    contests = [
        {("ours", "fwd"): 3.0, ("sdpa", "fwd"): 2.0, ("ours", "fwd+bwd"): 5.0, ("sdpa", "fwd+bwd"): 6.0},
        {("ours", "fwd"): 3.0, ("sdpa", "fwd"): 2.0, ("ours", "fwd+bwd"): 5.0, ("sdpa", "fwd+bwd"): 6.0},
    ]
    entry = tune.table_entry(key, a, f, contests)
    assert entry["fwd"] == a.to_json() and entry["bwd"] == f.to_json()
    assert entry["auto"] == {"fwd": "sdpa", "fwd+bwd": "triton"}  # ours 6 vs 4 forward; 10 vs 12 both ways
    assert entry["measured_ms"] == {"ours fwd": 6.0, "sdpa fwd": 4.0, "ours fwd+bwd": 10.0, "sdpa fwd+bwd": 12.0}
    plans.parse_entry(entry)  # a valid table entry


def test_write_table_merges_by_key_and_drops_invalid_entries(tmp_path):
    path = tmp_path / "gpu.json"
    old = {
        "block_d": 64,
        "seq_bucket": "1024",
        "dtype": "bf16",
        "mask": "raw",
        "auto": {"fwd": "sdpa", "fwd+bwd": "sdpa"},
    }
    tiles = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}
    old |= {"fwd": {"variant": "v2", "tiles": tiles}, "bwd": {"variant": "fused", "tiles": tiles}}
    replaced = old | {"seq_bucket": "256"}
    path.write_text(json.dumps({"schema": 1, "entries": [old, replaced, {"broken": True}]}))
    key = plans.ShapeKey(64, "256", "bf16", "raw")
    new = replaced | {"auto": {"fwd": "triton", "fwd+bwd": "triton"}}
    tune.write_table(str(path), {key: new}, {"device": "x", "torch": "t", "triton": "3", "date": "d"})
    entries = json.loads(path.read_text())["entries"]
    assert sorted(e["seq_bucket"] for e in entries) == ["1024", "256"]
    assert next(e for e in entries if e["seq_bucket"] == "256")["auto"]["fwd"] == "triton"
    assert not list(tmp_path.glob("*.tmp*"))


def test_compile_identity_groups_rules_by_what_they_compile():
    """Candidates are compiled once per kernel specialisation: rules without the diagonal share one."""
    c = tune.Candidate("bwd", "fused", T(64, 32, 4, 2))
    cases = [tune.Case("s", 8, 6, 197, 10, 64, rule, "bf16") for rule in tune.RULES]
    identities = {tune._compile_identity(case, c) for case in cases}
    assert len(identities) == 2  # QUERY_SELF False (prefix+raw, raw, bidirectional) and True


TINY47 = tune.Case("tiny47", *tune.TINY_SHAPES["tiny47"], "raw+self", "fp32")
BAD = T(16, 32, 1, 1)  # the second tiny tile: it runs after a good candidate has filled the outputs


def _gate(monkeypatch, direction: str, spoil) -> dict:
    """Measure TINY47 with ``spoil(launches, outputs)`` replacing the launches of the BAD candidate in
    ``direction``; returns ``{(stage, candidate label): status}``."""
    name = "forward_launches" if direction == "fwd" else "backward_launches"
    real = getattr(tune.ops, name)

    def spoiled(*args):
        launches = real(*args)
        plan = args[-2]
        tiles = plan.fwd_tiles if direction == "fwd" else plan.bwd_tiles
        bad_variant = plan.fwd == "v2" if direction == "fwd" else plan.bwd == "fused"
        return spoil(launches, args) if tiles == BAD and bad_variant else launches

    monkeypatch.setattr(tune.ops, name, spoiled)
    rows = []
    result = tune.measure_case(TINY47, "cpu", True, {}, rows)
    status = {(r["stage"], r["candidate"]): r["status"] for r in rows}
    label = (tune.Candidate(direction, "v2" if direction == "fwd" else "fused", BAD)).label()
    others = {k: v for k, v in status.items() if k != (direction, label)}
    assert set(others.values()) == {"ok"}, others  # the spoiling touches the BAD candidate only
    chosen = tune.choose_plan([result])
    assert chosen is not None and BAD not in (chosen[0].tiles, chosen[1].tiles)
    assert tune.Candidate(direction, label.split()[0], BAD) not in result[direction]
    return status[(direction, label)]


def test_a_candidate_with_a_wrong_output_is_rejected(monkeypatch):
    assert _gate(monkeypatch, "fwd", lambda launches, args: launches + [args[3].zero_]) == "inexact"


def test_a_forward_that_writes_nothing_is_rejected(monkeypatch):
    """Outputs are NaN-filled before each check: the previous candidate's results cannot pass for it."""
    assert _gate(monkeypatch, "fwd", lambda launches, args: []).startswith("inexact")


def test_a_forward_with_a_wrong_log_sum_exp_is_rejected(monkeypatch):
    """The output is right but the log-sum-exp the backward reads is off by 0.01 (base 2)."""
    status = _gate(monkeypatch, "fwd", lambda launches, args: launches + [lambda: args[4].add_(0.01)])
    assert status == "inexact lse"


def test_a_forward_leaving_a_row_of_the_log_sum_exp_unwritten_is_rejected(monkeypatch):
    """The output is right, but the last row's log-sum-exp keeps whatever the buffer held before."""

    def skip_last_lse_row(launches, args):
        lse, before = args[4], []
        save = lambda: before.append(lse[:, -1].clone())  # noqa: E731
        restore = lambda: lse[:, -1].copy_(before.pop())  # noqa: E731
        return [save, *launches, restore]

    assert _gate(monkeypatch, "fwd", skip_last_lse_row) == "inexact lse"


def test_a_backward_that_writes_nothing_is_rejected(monkeypatch):
    assert _gate(monkeypatch, "bwd", lambda launches, args: []) == "inexact"


def test_the_table_stores_the_plan_raced_against_sdpa(tmp_path, monkeypatch, capsys):
    """Two shapes share a key; per shape a different candidate is fastest (fake timings), but the key's
    plan is the one with the least summed time. That stored plan, not each shape's favourite, is what
    runs end to end against SDPA on both shapes, decides ``auto``, and what the summary prints."""
    shapes = {"a": (1, 2, 37, 10, 16), "b": (1, 2, 30, 10, 16)}  # L = 47 and 40: one key (bucket 64)
    monkeypatch.setattr(tune, "TINY_SHAPES", shapes)
    v2_32, v2_16 = plans.INTERPRETER_TILES, BAD
    fake = {  # per shape: the 32-row tiles fastest on a, the 16-row tiles on b; the 32-row tiles win on the sum
        "a": {f"v2 {v2_32}": 2, f"v2 {v2_16}": 10, f"fused {v2_32}": 3, f"fused {v2_16}": 10},
        "b": {f"v2 {v2_32}": 2, f"v2 {v2_16}": 3, f"fused {v2_32}": 3, f"fused {v2_16}": 1},
    }
    real_measure, real_timing, current = tune.measure_case, tune.interleaved_ms, {}

    def measure(case, *args):
        current["shape"] = case.shape
        return real_measure(case, *args)

    def fake_kernel_times(fns, device, **kwargs):  # the candidates' kernels still run; their times are faked
        times = real_timing(fns, device, **kwargs)
        if all(isinstance(name, tune.Candidate) for name in fns):
            return {c: fake[current["shape"]].get(c.label(), 20.0) for c in fns}
        return times

    monkeypatch.setattr(tune, "measure_case", measure)
    monkeypatch.setattr(tune, "interleaved_ms", fake_kernel_times)
    table_dir, out = tmp_path / "tiles", tmp_path / "out"
    args = ["--device", "cpu", "--tiny", "--rules", "raw", "--skip_precompile"]
    tune.main([*args, "--table_dir", str(table_dir), "--output_dir", str(out)])
    (path,) = table_dir.glob("*.json")
    check_table_file(str(path))
    (entry,) = json.loads(path.read_text())["entries"]
    stored = tune.plan_label(tune.Candidate("fwd", "v2", v2_32), tune.Candidate("bwd", "fused", v2_32))
    assert entry["fwd"] == {"variant": "v2", "tiles": v2_32.to_json()} and entry["bwd"]["tiles"] == v2_32.to_json()
    rows = list(csv.DictReader(open(out / "tune.csv")))
    e2e = [r for r in rows if r["stage"].startswith("e2e") and r["candidate"] != "sdpa"]
    assert sorted((r["shape"], r["stage"]) for r in e2e) == [
        ("a", "e2e fwd"),
        ("a", "e2e fwd+bwd"),
        ("b", "e2e fwd"),
        ("b", "e2e fwd+bwd"),
    ]
    assert {r["candidate"] for r in e2e} == {stored}
    for mode in ("fwd", "fwd+bwd"):  # auto is decided from exactly these end-to-end times
        ours = sum(float(r["ms"]) for r in e2e if r["stage"] == f"e2e {mode}")
        sdpa = sum(float(r["ms"]) for r in rows if r["stage"] == f"e2e {mode}" and r["candidate"] == "sdpa")
        assert entry["measured_ms"][f"ours {mode}"] == round(ours, 4)
        assert entry["auto"][mode] == ("triton" if ours <= sdpa else "sdpa")
    (summary_line,) = [line for line in report.tune_summary(rows) if line.startswith(" 16")]
    assert summary_line.endswith(stored.removeprefix("ours: "))


def test_interleaved_timing_rotates_the_order_and_times_each_function():
    """Each repetition calls every function once, starting one further along each time (no
    candidate always first or last while the clock drifts); one warm-up call each; leaves' grads
    reset before every call; one median per function."""
    from bench import common

    calls, leaf = [], torch.zeros(1, requires_grad=True)

    def make(name):
        def fn():
            assert leaf.grad is None
            leaf.grad = torch.ones(1)
            calls.append(name)

        return fn

    times = common.interleaved_ms({n: make(n) for n in "abc"}, "cpu", grad_to_none=[leaf])
    assert set(times) == {"a", "b", "c"} and all(t >= 0 for t in times.values())
    reps = common.CPU_REPS
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    expected = [n for r in range(reps) for n in ("abc"[r % 3 :] + "abc"[: r % 3])]
    assert calls[3:] == expected and reps >= 2 and common.MIN_REPS >= 50


def test_a_forward_wrong_only_on_the_second_input_is_rejected(monkeypatch):
    """Each candidate is checked on two different inputs: one right by chance on the first is caught."""
    m = tune.Measurement(TINY47, "cpu", True)
    real = tune.ops.forward_launches

    def wrong_on_second(q, *args):
        launches = real(q, *args)
        return launches + [args[2].zero_] if q is m.inputs[1].q else launches  # args[2]: the output view

    monkeypatch.setattr(tune.ops, "forward_launches", wrong_on_second)
    candidate = tune.Candidate("fwd", "v2", BAD)
    assert m.check(candidate)[1] == "inexact"
    monkeypatch.setattr(tune.ops, "forward_launches", real)
    assert m.check(candidate)[1] == "ok"


def test_the_backward_gate_checks_each_row_group_against_its_own_bound(monkeypatch):
    """In fp16 an error on the query keys' dK (a few small rows) that stays far below the whole gradient's
    bound, which the largest rows set, is still caught: each group has the bound SDPA earns on it."""
    case = tune.Case("tiny47", *tune.TINY_SHAPES["tiny47"], "raw+self", "fp16")
    m = tune.Measurement(case, "cpu", True)
    x = m.inputs[0]
    group = "dK/dV query keys"
    group_bound = x.bounds["bwd"][group]
    _, same_grad = tune._sdpa_with_grad(x.qkv, x.do, case.layout)
    whole_bound = 2 * tune._error(same_grad, x.truth_grad) + tune.ERROR_FLOOR[torch.float16]
    error = (group_bound + whole_bound) / 2
    assert group_bound < error < whole_bound  # a whole-tensor gate would pass this candidate
    real = tune.ops.backward_launches
    R = case.layout.num_raw

    def spoiled(*args):
        dk = args[7]  # [B, H, L, D] view of the packed gradient
        return real(*args) + [lambda: dk[:, :, R:].add_(error)]

    monkeypatch.setattr(tune.ops, "backward_launches", spoiled)
    candidate = tune.Candidate("bwd", "fused", BAD)
    launches, status, reported, bound = m.check(candidate)
    assert status == "inexact" and bound == group_bound and reported > bound
    monkeypatch.setattr(tune.ops, "backward_launches", real)
    assert m.check(candidate)[1] == "ok"


def test_the_exact_candidates_of_a_direction_are_timed_in_one_interleaved_run(monkeypatch):
    """Candidates are checked first, then each direction's exact ones share one interleaved timing run;
    an inexact candidate is never timed and is reported with a NaN time."""
    calls = []
    real = tune.interleaved_ms

    def recorded(fns, device, *args, **kwargs):
        calls.append(list(fns))
        return real(fns, device, *args, **kwargs)

    monkeypatch.setattr(tune, "interleaved_ms", recorded)
    real_forward = tune.ops.forward_launches

    def bad_tile_zeroes(*args):
        launches = real_forward(*args)
        return launches + [args[3].zero_] if args[-2].fwd_tiles == BAD else launches

    monkeypatch.setattr(tune.ops, "forward_launches", bad_tile_zeroes)
    rows = []
    result = tune.measure_case(TINY47, "cpu", True, {}, rows)
    expected = {d: [c for c in tune.candidates(TINY47, True) if c.direction == d] for d in ("fwd", "bwd")}
    bad = tune.Candidate("fwd", "v2", BAD)
    assert calls == [[c for c in expected["fwd"] if c != bad], expected["bwd"]]
    assert set(result["fwd"]) == set(expected["fwd"]) - {bad} and set(result["bwd"]) == set(expected["bwd"])
    timed = {r["candidate"]: r["ms"] for r in rows}
    assert math.isnan(float(timed[bad.label()])) and all(ms > 0 for ms in result["fwd"].values())


class _FakeGraph:
    """A captured call that replays in a fixed time: stands in for a CUDA graph on CPU."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def replay(self):
        time.sleep(self.seconds)


def test_auto_decides_on_gpu_time_and_stores_the_python_cost_beside_it(monkeypatch):
    """A fake CUDA-graph capture on CPU: replays of ours take 1 ms and of SDPA 20 ms, while eagerly ours
    (the interpreter) is far slower than SDPA. ``auto`` must follow the replays (the GPU time), not the
    eager times, and store the Python cost (eager minus replay) beside them. SDPA's forward cannot be
    captured here: it falls back to its eager time, marked so, and the run goes on. Catches a decision
    on eager times, a capture failure that ends the run, and a Python cost stored as the wrong
    difference."""
    from bench import common

    ran = []
    real_api = tune.adclr_attention_packed

    def recording_api(qkv, layout, backend):
        ran.append((backend, torch.is_grad_enabled()))
        return real_api(qkv, layout, backend=backend)

    def fake_capture(fn, device, grad_to_none=None):
        ran.clear()
        fn()
        backend, grad = ran[-1]
        if backend == "sdpa" and not grad:
            raise RuntimeError("operation not permitted when stream is capturing")
        return _FakeGraph(0.001 if backend == "triton" else 0.02)

    monkeypatch.setattr(tune, "adclr_attention_packed", recording_api)
    monkeypatch.setattr(common, "capture_graph", fake_capture)
    case = TINY47
    fwd, bwd = tune.Candidate("fwd", "v2", plans.INTERPRETER_TILES), tune.Candidate("bwd", "short", T(0, 0, 1, 1))
    rows = []
    timings = tune.end_to_end(case, "cpu", fwd, bwd, rows)
    ours, sdpa = timings[("ours", "fwd+bwd")], timings[("sdpa", "fwd+bwd")]
    assert ours.eager_ms > sdpa.eager_ms and ours.graph_ms < sdpa.graph_ms  # the two clocks disagree
    failed = timings[("sdpa", "fwd")]
    assert failed.graph_ms is None and failed.gpu_ms == failed.eager_ms
    assert failed.source.startswith("eager (capture failed: RuntimeError: operation not permitted")

    entry = tune.decide(case.key, fwd, bwd, [timings])
    assert entry["auto"]["fwd+bwd"] == "triton"
    assert entry["measured_ms"]["ours fwd+bwd"] == round(ours.graph_ms, 4)
    assert entry["python_ms"]["ours fwd+bwd"] == round(ours.eager_ms - ours.graph_ms, 4)
    assert entry["python_ms"]["sdpa fwd"] is None  # no replay, no Python cost to show
    assert entry["auto"]["fwd"] == ("triton" if timings[("ours", "fwd")].graph_ms <= failed.eager_ms else "sdpa")
    plans.parse_entry(entry)

    e2e = {(r["candidate"] == "sdpa", r["stage"]): r for r in rows}
    row = e2e[(False, "e2e fwd+bwd")]
    assert row["ms"] == ours.graph_ms and row["eager_ms"] == ours.eager_ms and row["timing"] == "graph"
    assert row["python_ms"] == ours.eager_ms - ours.graph_ms
    assert e2e[(True, "e2e fwd")]["timing"] == failed.source and e2e[(True, "e2e fwd")]["ms"] == failed.eager_ms
