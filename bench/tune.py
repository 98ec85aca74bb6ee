"""Tune the ADCLR kernels on this GPU by measurement; write the winners to ``kernels/tiles/<gpu>.json``.

    python -m bench.tune                                  # real ViT shapes, every rule, bf16 + fp16 (GPU)
    python -m bench.tune --precompile_only --jobs 16      # only compile every candidate (parallel)
    python -m bench.tune --skip_precompile                # Triton's cache is already warm
    TRITON_INTERPRET=1 python -m bench.tune --device cpu --tiny --table_dir /tmp/tiles   # smoke test

1. Every candidate (forward: v2 x tiles; backward: fused x tiles, short x warps where L
   fits one tile) is compiled first in a pool of processes that share Triton's on-disk cache, by
   running it once at batch 1 with the real strides (what a ViT call specialises to).
2. Per case (shape x rule x dtype, most important first): each candidate runs on two random inputs into
   NaN-filled outputs and must pass the test suite's accuracy rule against a float32 SDPA result on
   every row group (``row_groups``: raw and query rows; dQ rows, and dK/dV of the prefix, patch and
   query keys), each group's error at most twice SDPA's own on it in the same dtype plus one ulp; the
   forward's log-sum-exp, which the backward reads, within 1e-4 relative of the fp32 one over each
   row's allowed keys; then the exact candidates' kernels are timed alone, every candidate of a
   direction in one interleaved run (``bench.common.interleaved_ms``: CUDA events, L2 flushed before
   each call, at least 50 repetitions; the GPU is first kept busy until its clock is stable). An inexact or
   failing candidate is reported and never chosen.
3. The shapes that share a key (head dim, sequence bucket, dtype, mask kind) decide its plan: the
   forward and the backward exact on all of them with the least summed time.
4. That plan, the one the table stores, is timed end to end through the public API (forward under
   ``no_grad``; forward + backward) on every shape of the key, side by side with the exact SDPA
   fallback (``backend="sdpa"``), the two interleaved call by call (50 repetitions each), twice
   (``bench.common.time_calls``): eagerly, as a model calls it (GPU work plus the host time the GPU
   waits for), and replayed from a CUDA graph of the call (the GPU work alone). ``auto`` takes, per
   mode, whichever summed lower GPU time (the eager time for a call that could not be captured, marked
   so); the Python cost (eager minus graph) is stored and shown beside it. The table is
   merged into the existing one and rewritten after every key (atomic replace), so a run cut short
   keeps what it measured; ``--budget_s`` stops starting new keys.

Outputs under ``--output_dir`` (default ``bench/results/<date>_<device>/``): ``tune.csv`` (every
measurement), ``tune.md`` (the decisions) and a copy of the table under ``tiles/``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time

import torch

from adclr.kernels import adclr_attention_packed, plans
from adclr.kernels import device as kernel_device
from adclr.kernels import triton_attention as ops
from bench.common import DTYPES, ERROR_FLOOR, VIT_SHAPES, Case, interleaved_ms, time_calls, warm_until_stable
from bench.report import atomic_write, device_stamp, results_dir

# Most important first, so a run cut short by --budget_s has the keys training uses most: the default
# rule, then the full mask (bidirectional stands in for every call without query tokens: the local
# crops and evaluation), then the other rules.
RULES = ("prefix+raw", "bidirectional", "raw+self", "raw", "prefix+raw+self")
TINY_SHAPES = {"tiny47": (1, 2, 37, 10, 16), "tiny80": (1, 2, 70, 10, 16)}  # buckets 64 and 128
TINY_TILES = (plans.INTERPRETER_TILES, plans.Tiles(16, 32, 1, 1))


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One variant with its tiles, for one direction (``fwd`` or ``bwd``)."""

    direction: str
    variant: str
    tiles: plans.Tiles

    def label(self) -> str:
        return f"{self.variant} {self.tiles}"

    def to_json(self) -> dict:
        return {"variant": self.variant, "tiles": self.tiles.to_json()}


def candidates(case: Case, tiny: bool) -> list[Candidate]:
    """Forward then backward candidates. Head dims above 64 and fp32 try the built-in tiles only."""
    length, dtype = case.layout.length, DTYPES[case.dtype]
    rows = max(32, plans.short_block(length))  # no block of rows larger than the padded sequence
    if tiny:
        forward, fused, short = TINY_TILES, TINY_TILES, [plans.Tiles(0, 0, 1, 1)]
    elif plans.block_d(case.head_dim) <= 64 and dtype != torch.float32:
        forward = [t for t in plans.FWD_CANDIDATES if t.block_m <= rows]
        fused = [t for t in plans.FUSED_CANDIDATES if t.block_m <= rows]
        short = list(plans.SHORT_CANDIDATES)
    else:
        forward = [plans.fwd_tiles(length, case.head_dim, dtype)]
        fused = [plans.fused_tiles(length, case.head_dim, dtype)]
        short = [plans.short_tiles(length, case.head_dim)]
    out = [Candidate("fwd", "v2", t) for t in forward] + [Candidate("bwd", "fused", t) for t in fused]
    if plans.short_eligible(length, case.head_dim):
        out += [Candidate("bwd", "short", t) for t in short]
    return out


def plan_of(candidate: Candidate, case: Case, tiny: bool) -> plans.Plan:
    """The candidate in one direction, the default (or interpreter) plan in the other."""
    length, dtype = case.layout.length, DTYPES[case.dtype]
    default = plans.default_plan(length, case.head_dim, dtype, interpreting=tiny)
    if candidate.direction == "fwd":
        return dataclasses.replace(default, fwd=candidate.variant, fwd_tiles=candidate.tiles)
    return dataclasses.replace(default, bwd=candidate.variant, bwd_tiles=candidate.tiles)


# --------------------------------------------------------------------------------------------------
# Precompile: a process pool, Triton's on-disk cache shared
# --------------------------------------------------------------------------------------------------


def _compile_identity(case: Case, candidate: Candidate) -> tuple:
    """Candidates that compile to the same kernels (the layout's numbers are runtime arguments)."""
    self_ = case.layout.kernel_params[2]
    block = plans.short_block(case.layout.length) if candidate.variant == "short" else 0
    return (candidate, case.dtype, case.head_dim, self_, block)


def warm(task: tuple) -> str | None:
    """Run one candidate once at batch 1 (the worker of the pool): compiles it into Triton's cache.
    Returns None, or the error it raised."""
    case, candidate, device, tiny = task
    try:
        layout = case.layout
        qkv = torch.randn(1, layout.length, 3, case.heads, case.head_dim, dtype=DTYPES[case.dtype], device=device)
        with plans.forced_plan(plan_of(candidate, case, tiny)):
            if candidate.direction == "fwd":
                with torch.no_grad():
                    adclr_attention_packed(qkv, layout, backend="triton")
            else:
                qkv.requires_grad_()
                adclr_attention_packed(qkv, layout, backend="triton").sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return None
    except Exception as error:  # noqa: BLE001 - a candidate that cannot compile is reported, not fatal
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def precompile(cases: list[Case], device: str, tiny: bool, jobs: int, log=print) -> dict:
    """Compile every distinct candidate of ``cases`` in ``jobs`` processes; ``{identity: error}``."""
    tasks = {}
    for case in cases:
        for candidate in candidates(case, tiny):
            tasks.setdefault(_compile_identity(case, candidate), (case, candidate, device, tiny))
    start, failed = time.time(), {}
    log(f"precompile: {len(tasks)} distinct candidates in {jobs} processes")
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(warm, task): identity for identity, task in tasks.items()}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            identity = futures[future]
            error = future.result()
            if error:
                failed[identity] = error
                log(f"  compile failed: {identity[0].label()} {identity[1]} D{identity[2]} self={identity[3]}: {error}")
            if done % 10 == 0 or done == len(futures):
                log(f"  {done}/{len(futures)} compiled ({time.time() - start:.0f} s)")
    return failed


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.double() - expected.double()).abs()
    return math.inf if not torch.isfinite(diff).all() else diff.max().item()


def _sdpa_with_grad(qkv: torch.Tensor, do: torch.Tensor, layout) -> tuple[torch.Tensor, torch.Tensor]:
    qkv = qkv.detach().requires_grad_()
    out = adclr_attention_packed(qkv, layout, backend="sdpa")
    (grad,) = torch.autograd.grad(out, qkv, do)
    return out.detach(), grad


def row_groups(layout) -> dict[str, dict[str, tuple]]:
    """The slices a gate checks apart, per direction: forward output rows (raw, query), and the backward's
    dQ rows (raw, query) and dK/dV keys (prefix, patches, queries); empty groups are left out. An error
    confined to a few rows (the query rows, the prefix key) is then measured against what SDPA makes
    of those rows, not hidden under the largest error of the whole tensor. Indices are into ``[B, L, ...]``
    outputs and ``[B, L, 3, H, D]`` packed gradients."""
    P, R, L = layout.num_prefix, layout.num_raw, layout.length
    ranges = {"raw rows": (0, R), "query rows": (R, L)}
    keys = {"prefix keys": (0, P), "patch keys": (P, R), "query keys": (R, L)}
    fwd = {name: (slice(None), slice(*span)) for name, span in ranges.items() if span[1] > span[0]}
    bwd = {f"dQ {name}": (slice(None), slice(*span), 0) for name, span in ranges.items() if span[1] > span[0]}
    bwd |= {
        f"dK/dV {name}": (slice(None), slice(*span), slice(1, 3)) for name, span in keys.items() if span[1] > span[0]
    }
    return {"fwd": fwd, "bwd": bwd}


class _Input:
    """One random input of a case: its fp32 truth (SDPA in fp32) and, per row group, the bound a candidate's
    error must meet: twice what SDPA in the case's dtype errs on that group, plus the dtype's floor."""

    def __init__(self, case: Case, device: str, groups: dict, seed: int):
        layout, dtype = case.layout, case.torch_dtype
        generator = torch.Generator(device).manual_seed(seed)
        shape = (case.batch, layout.length, 3, case.heads, case.head_dim)
        self.qkv = torch.randn(shape, dtype=dtype, device=device, generator=generator)
        self.do = torch.randn(
            case.batch, layout.length, case.heads, case.head_dim, dtype=dtype, device=device, generator=generator
        )
        self.truth, self.truth_grad = _sdpa_with_grad(self.qkv.float(), self.do.float(), layout)
        same, same_grad = _sdpa_with_grad(self.qkv, self.do, layout)
        floor = ERROR_FLOOR[dtype]
        self.bounds = {
            "fwd": {name: 2 * _error(same[i], self.truth[i]) + floor for name, i in groups["fwd"].items()},
            "bwd": {name: 2 * _error(same_grad[i], self.truth_grad[i]) + floor for name, i in groups["bwd"].items()},
        }
        q, k, v = self.qkv.permute(2, 0, 3, 1, 4).unbind(0)
        self.q, self.k, self.v = q, k, v
        # The base-2 log-sum-exp the backward reads: fp32 over each row's allowed keys, as the tests check it.
        scores = (q.float() @ k.float().transpose(-2, -1)) * case.head_dim**-0.5
        allowed = layout.dense_mask(device)
        self.lse_truth = (scores.masked_fill(~allowed, -math.inf).logsumexp(-1) * ops.LOG2E).flatten(0, 1)
        self.lse_bound = 1e-4 * max(1.0, self.lse_truth.abs().max().item())
        self.do_view = self.do.transpose(1, 2)


class Measurement:
    """Two random inputs of one case with their exactness bounds, and preallocated outputs, for checking
    candidates on both and timing their kernels alone (on the first)."""

    def __init__(self, case: Case, device: str, tiny: bool):
        self.case, self.device, self.tiny = case, device, tiny
        self.layout, self.scale = case.layout, case.head_dim**-0.5
        self.groups = row_groups(case.layout)
        self.inputs = [_Input(case, device, self.groups, seed) for seed in (0, 1)]
        q = self.inputs[0].q
        self.o, self.o_view, self.lse = ops.forward_outputs(q, seq_major=True)
        self.grads, self.grad_views = ops.gradient_outputs(q, seq_major=True)
        self.capability = kernel_device.capability(device)

    def _launches(self, candidate: Candidate, x: _Input) -> tuple[list, list]:
        plan = plan_of(candidate, self.case, self.tiny)
        params = self.layout.kernel_params
        fwd = ops.forward_launches(x.q, x.k, x.v, self.o_view, self.lse, params, self.scale, plan, self.capability)
        if candidate.direction == "fwd":
            return fwd, []
        dq, dk, dv = self.grad_views
        bwd = ops.backward_launches(
            x.do_view, x.q, x.k, x.v, self.o_view, self.lse, dq, dk, dv, params, self.scale, plan, self.capability
        )
        return fwd, bwd

    def check(self, candidate: Candidate) -> tuple[list, str, float, float]:
        """Run the candidate on each input into NaN-filled outputs (rows it leaves unwritten fail instead of
        passing on an earlier candidate's values) and compare every row group with its bound.
        ``(its launches on the first input, status, error, bound)``; status ``ok``, ``inexact`` (a group of
        the output or of the gradients; error and bound are that group's) or ``inexact lse`` (the
        forward's log-sum-exp)."""
        timed, worst = None, (0.0, math.nan, math.nan)  # (error / bound, error, bound) of the closest group
        for x in self.inputs:
            for t in (self.o, self.lse, self.grads):
                t.fill_(math.nan)
            fwd, bwd = self._launches(candidate, x)
            for launch in fwd + bwd:
                launch()
            timed = timed or (fwd if candidate.direction == "fwd" else bwd)
            if candidate.direction == "fwd":
                lse_error = _error(self.lse, x.lse_truth)
                if lse_error > x.lse_bound:
                    return timed, "inexact lse", lse_error, x.lse_bound
            actual, truth = (self.o, x.truth) if candidate.direction == "fwd" else (self.grads, x.truth_grad)
            for name, index in self.groups[candidate.direction].items():
                error, bound = _error(actual[index], truth[index]), x.bounds[candidate.direction][name]
                if not error <= bound:
                    return timed, "inexact", error, bound
                worst = max(worst, (error / bound, error, bound))
        return timed, "ok", worst[1], worst[2]


def measure_case(case: Case, device: str, tiny: bool, failed: dict, rows: list) -> dict:
    """Check every candidate of ``case``, then time the exact ones' kernels alone, all candidates of a
    direction in one interleaved run (so that a clock drift favours none of them):
    ``{"fwd": {candidate: ms}, "bwd": {...}}``."""
    m = Measurement(case, device, tiny)
    checked = []  # (candidate, launches, status, error, bound)
    for candidate in candidates(case, tiny):
        identity = _compile_identity(case, candidate)
        if identity in failed:
            checked.append((candidate, None, f"compile failed: {failed[identity]}", math.nan, math.nan))
            continue
        try:
            checked.append((candidate, *m.check(candidate)))
        except Exception as err:  # noqa: BLE001 - one failing candidate must not stop the tuning
            checked.append((candidate, None, f"failed: {type(err).__name__}: {err}", math.nan, math.nan))
    results = {"fwd": {}, "bwd": {}}
    for direction, times in results.items():
        exact = {c: launches for c, launches, status, *_ in checked if status == "ok" and c.direction == direction}
        if exact:
            run = {c: (lambda launches=launches: [launch() for launch in launches]) for c, launches in exact.items()}
            times.update(interleaved_ms(run, device))
    for candidate, _, status, error, bound in checked:
        ms = results[candidate.direction].get(candidate, math.nan)
        rows.append(_row(case, candidate.direction, candidate.label(), ms, error, bound, status))
    del m
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def choose_plan(measured: list[dict]) -> tuple[Candidate, Candidate] | None:
    """The key's forward and backward: exact on every shape of the key, least summed time. None when
    some direction has no such candidate (the key then keeps the defaults)."""

    def best(direction):
        common = set.intersection(*(set(r[direction]) for r in measured))
        return min(common, key=lambda c: sum(r[direction][c] for r in measured), default=None)

    fwd, bwd = best("fwd"), best("bwd")
    return None if fwd is None or bwd is None else (fwd, bwd)


def plan_label(fwd: Candidate, bwd: Candidate) -> str:
    return f"ours: {fwd.label()} / {bwd.label()}"


def _public_call(qkv, do, layout, backend: str, plan: plans.Plan, backward: bool):
    """One call of ``adclr_attention_packed`` as a model makes it: under no_grad, or with its backward."""

    def run():
        with torch.set_grad_enabled(backward), plans.forced_plan(plan):
            out = adclr_attention_packed(qkv, layout, backend=backend)
            if backward:
                out.backward(do)

    return run


BACKENDS = (("sdpa", "sdpa"), ("ours", "triton"))


def end_to_end(case: Case, device: str, fwd: Candidate, bwd: Candidate, rows: list) -> dict:
    """The public call as a model makes it (``fwd`` under no_grad; ``fwd+bwd``), timed with the key's
    stored plan and with the exact SDPA fallback: ``{("ours" | "sdpa", mode): Timing}``."""
    layout = case.layout
    qkv = torch.randn(case.batch, layout.length, 3, case.heads, case.head_dim, dtype=case.torch_dtype, device=device)
    do = torch.randn(case.batch, layout.length, case.heads, case.head_dim, dtype=case.torch_dtype, device=device)
    plan = plans.Plan(fwd.variant, fwd.tiles, bwd.variant, bwd.tiles)
    times = {}
    for mode in ("fwd", "fwd+bwd"):
        leaf = qkv.detach().requires_grad_(mode != "fwd")
        runs = {who: _public_call(leaf, do, layout, backend, plan, mode != "fwd") for who, backend in BACKENDS}
        measured = time_calls(runs, device, grad_to_none=[leaf])  # ours and SDPA alternate, eager then graphs
        for who, _ in BACKENDS:
            times[(who, mode)] = timing = measured[who]
            label = "sdpa" if who == "sdpa" else plan_label(fwd, bwd)
            rows.append(_row(case, f"e2e {mode}", label, timing.gpu_ms, math.nan, math.nan, "ok", timing))
    return times


def _row(case: Case, stage, candidate, ms, error, bound, status, timing=None) -> dict:
    """One CSV row. ``ms`` is the time decisions use; for end-to-end rows ``timing`` adds the eager time,
    the Python cost (eager minus CUDA-graph replay) and where ``ms`` came from."""
    key = case.key
    extra = {"eager_ms": math.nan, "python_ms": math.nan, "timing": "kernels"}
    if timing is not None:
        extra = {k: v for k, v in timing.columns().items() if k != "ms"}
    return dict(
        shape=case.shape,
        batch=case.batch,
        heads=case.heads,
        L=case.layout.length,
        D=case.head_dim,
        rule=case.rule,
        dtype=case.dtype,
        block_d=key.block_d,
        seq_bucket=key.seq_bucket,
        mask=key.mask,
        stage=stage,
        candidate=candidate,
        ms=ms,
        max_err=error,
        bound=bound,
        status=status,
        **extra,
    )


def table_entry(key: plans.ShapeKey, fwd: Candidate, bwd: Candidate, contests: list[dict], python=None) -> dict:
    """The table entry of ``key``: its plan, and per mode the backend whose end-to-end GPU times with that
    plan (``contests``: per shape, ``{(who, mode): ms}``), summed over the key's shapes, were lower.
    ``python``: the same keys' Python cost per shape (NaN where a call was not captured), stored beside
    the times as ``python_ms`` (None where some shape lacks it)."""
    auto, ms, host = {}, {}, {}
    for mode in ("fwd", "fwd+bwd"):
        ours = sum(c[("ours", mode)] for c in contests)
        sdpa = sum(c[("sdpa", mode)] for c in contests)
        auto[mode] = "triton" if ours <= sdpa else "sdpa"
        ms[f"ours {mode}"], ms[f"sdpa {mode}"] = round(ours, 4), round(sdpa, 4)
        for who in ("ours", "sdpa"):
            total = sum(p[(who, mode)] for p in python or ())
            host[f"{who} {mode}"] = None if math.isnan(total) else round(total, 4)
    entry = {**dataclasses.asdict(key), "fwd": fwd.to_json(), "bwd": bwd.to_json(), "auto": auto, "measured_ms": ms}
    return entry if python is None else {**entry, "python_ms": host}


def decide(key: plans.ShapeKey, fwd: Candidate, bwd: Candidate, timings: list[dict]) -> dict:
    """``table_entry`` from ``end_to_end``'s timings: decided on GPU time, the Python cost beside it."""
    contests = [{k: t.gpu_ms for k, t in shape.items()} for shape in timings]
    return table_entry(key, fwd, bwd, contests, [{k: t.python_ms for k, t in shape.items()} for shape in timings])


def write_table(path: str, entries: dict, stamp: dict) -> None:
    """Merge ``entries`` (by key) into the table at ``path`` and replace it atomically."""
    existing = []
    if os.path.exists(path):
        try:
            with open(path) as f:
                existing = json.load(f).get("entries", [])
        except (OSError, ValueError, AttributeError):
            existing = []
    merged = {}
    for obj in existing:
        try:
            key, _ = plans.parse_entry(obj)
        except (ValueError, TypeError):
            continue
        merged[key] = obj
    merged.update(entries)
    table = {"schema": plans.TABLE_SCHEMA, **stamp, "entries": list(merged.values())}
    atomic_write(path, json.dumps(table, indent=1) + "\n")


def write_outputs(output_dir: str, rows: list, decisions: dict, stamp: dict, table_path: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    if rows:
        with open(os.path.join(output_dir, "tune.csv.tmp"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        os.replace(os.path.join(output_dir, "tune.csv.tmp"), os.path.join(output_dir, "tune.csv"))
    header = f"{stamp['device']}; torch {stamp['torch']}; triton {stamp['triton']}; {stamp['date']}"
    md = ["# tune", "", header, "", f"table: {table_path}", ""]
    md += [
        "Ratios of GPU time (CUDA-graph replay of the whole call; the eager time where a call could not be",
        "captured: tune.csv's timing column says which), summed over the key's shapes; `auto` decides on them.",
        "Python ms: what the host adds to each call (eager minus replay), summed likewise.",
        "",
    ]
    columns = ["block_d", "bucket", "dtype", "mask", "fwd", "bwd", "auto fwd", "auto fwd+bwd"]
    columns += ["ours / sdpa fwd", "ours / sdpa fwd+bwd"]
    columns += ["Python ms ours fwd / fwd+bwd", "Python ms sdpa fwd / fwd+bwd"]
    md += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for entry in decisions.values():
        ms, host = entry["measured_ms"], entry.get("python_ms", {})
        fwd = Candidate("fwd", entry["fwd"]["variant"], _tiles(entry["fwd"]["tiles"]))
        bwd = Candidate("bwd", entry["bwd"]["variant"], _tiles(entry["bwd"]["tiles"]))
        python = [" / ".join(_ms(host.get(f"{who} {m}")) for m in ("fwd", "fwd+bwd")) for who in ("ours", "sdpa")]
        md.append(
            f"| {entry['block_d']} | {entry['seq_bucket']} | {entry['dtype']} | {entry['mask']} | {fwd.label()} | "
            f"{bwd.label()} | {entry['auto']['fwd']} | {entry['auto']['fwd+bwd']} | "
            f"{ms['ours fwd'] / ms['sdpa fwd']:.2f} | {ms['ours fwd+bwd'] / ms['sdpa fwd+bwd']:.2f} | "
            f"{python[0]} | {python[1]} |"
        )
    atomic_write(os.path.join(output_dir, "tune.md"), "\n".join(md) + "\n")
    os.makedirs(os.path.join(output_dir, "tiles"), exist_ok=True)
    if os.path.exists(table_path):
        with open(table_path) as f:
            atomic_write(os.path.join(output_dir, "tiles", os.path.basename(table_path)), f.read())


def _ms(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def _tiles(obj) -> plans.Tiles | None:
    return None if obj is None else plans.Tiles.from_json(obj)


def make_cases(shapes: dict, rules, dtypes) -> list[Case]:
    """Most important first: dtype, then rule, then shape (a cut-short run has the defaults' keys)."""
    return [
        Case(name, *shapes[name][:4], shapes[name][4], rule, dtype)
        for dtype in dtypes
        for rule in rules
        for name in shapes
    ]


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, interpreter tiles (CPU smoke test)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(VIT_SHAPES), default=list(VIT_SHAPES))
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"])
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="precompile processes")
    parser.add_argument("--precompile_only", action="store_true")
    parser.add_argument("--skip_precompile", action="store_true", help="compile on first use instead (cache warm)")
    parser.add_argument("--budget_s", type=float, default=math.inf, help="start no new case after this many seconds")
    parser.add_argument("--table_dir", help="where the table goes (default: $ADCLR_TILES_DIR or kernels/tiles/)")
    parser.add_argument("--output_dir", help="default: bench/results/<date>_<device>/")
    args = parser.parse_args(argv)
    interpreting = kernel_device.interpreter_enabled()
    if args.device == "cpu" and not (interpreting and args.tiny):
        raise SystemExit("on CPU run the smoke test: TRITON_INTERPRET=1 python -m bench.tune --device cpu --tiny")
    if args.device == "cuda" and interpreting:
        raise SystemExit("bench.tune measures GPU kernels: unset TRITON_INTERPRET")

    start = time.time()
    shapes = TINY_SHAPES if args.tiny else {name: VIT_SHAPES[name] for name in args.shapes}
    dtypes = ["fp32"] if args.tiny else args.dtypes
    cases = make_cases(shapes, args.rules, dtypes)
    failed = {} if args.skip_precompile else precompile(cases, args.device, args.tiny, args.jobs)
    warm_until_stable(args.device)  # before the first candidate: an idle GPU runs at a low clock
    if args.precompile_only:
        print(f"precompiled in {time.time() - start:.0f} s; {len(failed)} failed")
        return ""

    device = torch.device(args.device)
    stamp = device_stamp(device)
    output_dir = args.output_dir or results_dir(stamp)
    table_dir = args.table_dir or plans.tiles_dir()
    os.makedirs(table_dir, exist_ok=True)
    table_path = os.path.join(table_dir, plans.device_slug(stamp["device"]) + ".json")
    by_key: dict[plans.ShapeKey, list[Case]] = {}
    for case in cases:
        by_key.setdefault(case.key, []).append(case)
    rows, decisions, done = [], {}, 0
    for key, key_cases in by_key.items():
        if time.time() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s reached: {done} of {len(cases)} cases measured")
            break
        measured = []
        for case in key_cases:
            case_start = time.time()
            measured.append(measure_case(case, args.device, args.tiny, failed, rows))
            done += 1
            print(f"[{done}/{len(cases)}] {case.label()} ({time.time() - case_start:.1f} s)", flush=True)
        chosen = choose_plan(measured)
        if chosen is None:
            print(f"  {key}: no candidate exact on every shape in some direction; the defaults stay")
        else:
            timings = [end_to_end(case, args.device, *chosen, rows) for case in key_cases]
            decisions[key] = decide(key, *chosen, timings)
            write_table(table_path, {key: decisions[key]}, stamp)
        write_outputs(output_dir, rows, decisions, stamp, table_path)
    plans.clear_table_cache()
    print(f"table: {table_path}; {len(decisions)} keys decided in {time.time() - start:.0f} s")
    print(open(os.path.join(output_dir, "tune.md")).read() if decisions else "no decision")
    return output_dir


if __name__ == "__main__":
    main(sys.argv[1:])
