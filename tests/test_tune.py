"""The tuner: a CPU smoke run of ``python -m bench.tune`` (interpreter, tiny shapes, the same code path
as on a GPU: precompile pool, exactness gate, timing, table) and its decision logic."""

import csv
import json
import warnings

import pytest
import torch

from adclr.kernels import AttentionLayout, plans
from bench import tune

T = plans.Tiles


@pytest.mark.slow
def test_tune_smoke_run_writes_a_table_the_launcher_reads(tmp_path, monkeypatch):
    table_dir, out = tmp_path / "tiles", tmp_path / "out"
    args = ["--device", "cpu", "--tiny", "--rules", "raw+self", "--jobs", "2"]
    tune.main([*args, "--table_dir", str(table_dir), "--output_dir", str(out)])
    device = "CPU (Triton interpreter)"
    path = table_dir / (plans.device_slug(device) + ".json")
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
    assert {c.variant for c in short_candidates if c.direction == "bwd"} == {"v1", "fused", "short"}
    assert {c.variant for c in long_candidates if c.direction == "bwd"} == {"v1", "fused"}  # 795 rows: no one tile
    assert all(c.tiles.block_m <= 64 for c in short_candidates if c.tiles and c.tiles.block_m)  # L = 47
    # The defaults are among the candidates, so the tuner can only match or beat them.
    for case in (short, long):
        default = plans.default_plan(case.layout.length, 64, torch.bfloat16)
        labels = {c.label() for c in tune.candidates(case, False)}
        assert tune.Candidate("fwd", "v2", default.fwd_tiles).label() in labels
        assert tune.Candidate("bwd", default.bwd, default.bwd_tiles).label() in labels


def _result(fwd: dict, bwd: dict, ours: tuple, sdpa: tuple) -> dict:
    e2e = {
        ("ours", "fwd"): ours[0],
        ("ours", "fwd+bwd"): ours[1],
        ("sdpa", "fwd"): sdpa[0],
        ("sdpa", "fwd+bwd"): sdpa[1],
    }
    return {"fwd": fwd, "bwd": bwd, "e2e": e2e}


def test_decide_sums_over_shapes_and_skips_candidates_not_exact_everywhere():
    a, b = tune.Candidate("fwd", "v2", T(64, 64, 4, 2)), tune.Candidate("fwd", "v2", T(128, 64, 8, 3))
    f, s = tune.Candidate("bwd", "fused", T(64, 32, 4, 2)), tune.Candidate("bwd", "v1", None)
    key = plans.ShapeKey(64, "256", "bf16", "prefix+raw")
    # b is fastest on the first shape but was inexact on the second; a wins on the sum.
    measured = [
        _result({a: 1.0, b: 0.5}, {f: 2.0, s: 1.9}, (3.0, 5.0), (2.0, 6.0)),
        _result({a: 1.0}, {f: 2.0, s: 2.5}, (3.0, 5.0), (2.0, 6.0)),
    ]
    entry = tune.decide(key, measured)
    assert entry["fwd"] == a.to_json() and entry["bwd"] == f.to_json()  # f: 4.0 in all, s: 4.4
    assert entry["auto"] == {"fwd": "sdpa", "fwd+bwd": "triton"}  # ours 6 vs 4 forward; 10 vs 12 both ways
    plans.parse_entry(entry)  # a valid table entry
    assert tune.decide(key, [_result({}, {f: 1.0}, (1, 1), (1, 1))]) is None  # no exact forward: no entry


def test_write_table_merges_by_key_and_drops_invalid_entries(tmp_path):
    path = tmp_path / "gpu.json"
    old = {
        "block_d": 64,
        "seq_bucket": "1024",
        "dtype": "bf16",
        "mask": "raw",
        "auto": {"fwd": "sdpa", "fwd+bwd": "sdpa"},
    }
    old |= {"fwd": {"variant": "v1", "tiles": None}, "bwd": {"variant": "v1", "tiles": None}}
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


def test_an_inexact_candidate_is_reported_and_never_chosen(monkeypatch):
    """A forward candidate whose output is wrong fails the accuracy gate: not timed, not chosen."""
    bad = T(16, 32, 1, 1)
    real = tune.ops.forward_launches

    def corrupting(q, k, v, o, lse, params, scale, plan, capability):
        launches = real(q, k, v, o, lse, params, scale, plan, capability)
        return launches + [o.zero_] if plan.fwd_tiles == bad else launches

    monkeypatch.setattr(tune.ops, "forward_launches", corrupting)
    case = tune.Case("tiny47", *tune.TINY_SHAPES["tiny47"], "raw+self", "fp32")
    rows = []
    result = tune.measure_case(case, "cpu", True, {}, rows)
    status = {(r["stage"], r["candidate"]): r["status"] for r in rows}
    assert status[("fwd", tune.Candidate("fwd", "v2", bad).label())] == "inexact"
    assert all(s == "ok" for (stage, c), s in status.items() if c != tune.Candidate("fwd", "v2", bad).label())
    entry = tune.decide(case.key, [result])
    assert entry["fwd"] != tune.Candidate("fwd", "v2", bad).to_json()
    assert tune.Candidate("fwd", "v2", bad) not in result["fwd"]
