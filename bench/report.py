"""Benchmark output: one folder per run with a Markdown table, a CSV and (with matplotlib) a PNG plot,
each stamped with the device, torch and triton versions and the date; and the short summary of a GPU
check run (``python -m bench.report summary DIR``), which ``bench/gpu_check.sh`` prints last."""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import re

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PEERS = ("paper", "sdpa_mask", "sdpa_sliced", "flex", "flex_eager", "xformers")  # exact peers of ours


def device_stamp(device: torch.device) -> dict:
    import triton

    from adclr.kernels import device as kernel_device  # here: ``summary`` runs without the package

    return {
        "device": kernel_device.name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def results_dir(stamp: dict) -> str:
    """``bench/results/<date>_<device>/``: where a run writes unless told otherwise."""
    return os.path.join(RESULTS, f"{datetime.date.today().isoformat()}_{slug(stamp['device'])}")


def atomic_write(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader (or a run killed
    mid-write) sees the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


class Report:
    """Collects result rows and notes; ``write`` puts them under ``results/<date>_<device>/``."""

    def __init__(self, name: str, output_dir: str | None, device: torch.device):
        self.name, self.rows, self.notes = name, [], []
        self.stamp = device_stamp(device)
        self.output_dir = output_dir or results_dir(self.stamp)

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def header(self) -> str:
        s = self.stamp
        return f"{s['device']}; torch {s['torch']}; triton {s['triton']}; {s['date']}"

    def markdown(self) -> str:
        lines = [f"# {self.name}", "", self.header(), ""]
        if self.rows:
            columns = list(dict.fromkeys(c for r in self.rows for c in r))
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in self.rows]
        if self.notes:
            lines += ["", "Notes:", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"

    def csv_text(self) -> str:
        import io

        columns = list(dict.fromkeys(c for r in self.rows for c in r))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["device", "torch", "triton", "date", *columns])
        writer.writeheader()
        writer.writerows({**self.stamp, **r} for r in self.rows)
        return out.getvalue()

    def write(self, plot_x: str | None = None, plot: bool = True) -> str:
        """Write the table and CSV (atomically: safe to call after every case) and, with ``plot``, the PNG."""
        os.makedirs(self.output_dir, exist_ok=True)
        base = os.path.join(self.output_dir, self.name)
        if plot:
            self._plot(base + ".png", plot_x)  # first: a missing matplotlib adds a note to the table
        atomic_write(base + ".md", self.markdown())
        if self.rows:
            atomic_write(base + ".csv", self.csv_text())
        return self.output_dir

    def _plot(self, path: str, x: str | None) -> None:
        """Bars of median ms per provider for each case (or lines over ``x`` for a sweep)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            if not any("matplotlib" in n for n in self.notes):
                self.note("no PNG: matplotlib is not installed (pip install -e '.[bench]')")
            return
        rows = [r for r in self.rows if "ms" in r and (not x or str(r.get("shape", "")).startswith("sweep"))]
        if not rows:
            return
        key = (
            (lambda r: r[x])
            if x
            else (lambda r: " ".join(str(r[k]) for k in ("shape", "rule", "dtype", "mode") if k in r))
        )
        cases = list(dict.fromkeys(key(r) for r in rows))
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(cases) * len(providers) / 3), 4.5))
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            values = {key(r): r["ms"] for r in rows if r["provider"] == provider}
            ax.bar([j + i * width for j in range(len(cases))], [values.get(c, 0) for c in cases], width, label=provider)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("median ms")
        ax.set_title(self.header(), fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


# --------------------------------------------------------------------------------------------------
# The short summary of a GPU check run
# --------------------------------------------------------------------------------------------------


def _read_csv(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def attention_summary(rows: list[dict]) -> list[str]:
    """Per case: ours, full SDPA (the target: ours <= 1.1x), the fastest exact peer (ViT-S/16 global
    target: >= 1.6x ours) and peak memory of ours against the SDPA fallbacks', in GPU time; then
    ours' Python cost per case."""
    if not rows:
        return ["kernel benchmark: no results"]
    cases: dict[tuple, dict] = {}
    python = []  # ours' Python cost per case, where its call was captured
    for r in rows:
        case = cases.setdefault((r["shape"], r["rule"], r["dtype"], r["mode"]), {})
        case[r["provider"]] = (_float(r["ms"]), _float(r.get("peak_mib")))
        if r["provider"] == "ours" and not math.isnan(_float(r.get("python_ms"))):
            python.append(f"{r['shape']} {r['rule']} {r['dtype']} {r['mode']} {_float(r['python_ms']):.3f}")
    out = [
        f"{'shape':16} {'rule':15} {'dtype':5} {'mode':7} {'ours ms':>8} {'full ms':>8} {'ours/full':>9} "
        f"{'best peer':>12} {'peer ms':>8} {'peer/ours':>9} {'MiB ours/sdpa':>14}"
    ]
    for (shape, rule, dtype, mode), t in cases.items():
        ours, full = t.get("ours", (math.nan,) * 2), t.get("full_sdpa", (math.nan,) * 2)
        peers = {p: t[p] for p in PEERS if p in t and not math.isnan(t[p][0])}
        peer = min(peers, key=lambda p: peers[p][0], default="—")
        peer_ms = peers[peer][0] if peers else math.nan
        sdpa_mem = min((t[p][1] for p in ("sdpa_sliced", "sdpa_mask") if p in t), default=math.nan)
        memory = f"{ours[1]:.0f}/{sdpa_mem:.0f}" if not math.isnan(ours[1]) else "—"
        out.append(
            f"{shape:16} {rule:15} {dtype:5} {mode:7} {ours[0]:8.3f} {full[0]:8.3f} {ours[0] / full[0]:9.2f} "
            f"{peer:>12} {peer_ms:8.3f} {peer_ms / ours[0]:9.2f} {memory:>14}"
        )
    out.append("times: GPU time (CUDA-graph replay; eager where a call could not be captured, see attention.csv)")
    if python:
        out.append("ours' Python cost per call (eager - graph, ms): " + "; ".join(python))
    return out


def tune_summary(rows: list[dict]) -> list[str]:
    """Per key: ours against the SDPA fallback end to end, summed over the key's shapes, and the plan
    the table stores (the tuner times exactly that plan on every shape of the key, so every ``e2e``
    row of a key names it)."""
    if not rows:
        return ["tuner: no results"]
    keys: dict[tuple, dict] = {}
    for r in rows:
        if not r["stage"].startswith("e2e"):
            continue
        key = keys.setdefault((r["block_d"], r["seq_bucket"], r["dtype"], r["mask"]), {})
        who = "sdpa" if r["candidate"] == "sdpa" else "ours"
        if who == "ours":
            key["plan"] = r["candidate"].removeprefix("ours: ")
        key[(who, r["stage"][4:])] = key.get((who, r["stage"][4:]), 0.0) + _float(r["ms"])
        if who == "ours" and r["stage"] == "e2e fwd+bwd":
            key["python"] = key.get("python", 0.0) + _float(r.get("python_ms"))
    out = [
        f"{'D':>3} {'bucket':>6} {'dtype':5} {'mask':15} {'ours/sdpa fwd':>13} {'fwd+bwd':>8} {'py ms':>7}  "
        "plan (fwd / bwd)   [GPU time; py ms: ours' Python cost per fwd+bwd call]"
    ]
    for (block_d, bucket, dtype, mask), t in keys.items():
        ratios = [t.get(("ours", m), math.nan) / t[("sdpa", m)] for m in ("fwd", "fwd+bwd")]
        out.append(
            f"{block_d:>3} {bucket:>6} {dtype:5} {mask:15} {ratios[0]:13.2f} {ratios[1]:8.2f} "
            f"{t.get('python', math.nan):7.3f}  {t.get('plan', '—')}"
        )
    inexact = sorted({f"{r['stage']} {r['candidate']}" for r in rows if r["status"] != "ok"})
    if inexact:
        out.append(f"not chosen (inexact or failed): {'; '.join(inexact[:8])}" + (" ..." if len(inexact) > 8 else ""))
    return out


def pytest_summary(path: str) -> str:
    """The last summary line of a pytest log ("... passed, ... failed in ..."); for a run cut short,
    the counts of its verbose per-test lines and the tests that failed."""
    if not os.path.exists(path):
        return "GPU tests: no log"
    lines = [line.strip("= \n") for line in open(path, errors="replace")]
    finals = [line for line in lines if re.search(r"\d+ (passed|failed|error)", line)]
    if finals:
        return "GPU tests: " + finals[-1]
    counts = {word: sum(f" {word} " in f" {line} " for line in lines) for word in ("PASSED", "FAILED", "ERROR")}
    failed = [line.split()[-1] for line in lines if " FAILED " in f" {line} "]
    return f"GPU tests (cut short): {counts['PASSED']} passed, {counts['FAILED']} failed, {counts['ERROR']} errors" + (
        f"; failed: {', '.join(failed[:5])}" if failed else ""
    )


def summarize(out_dir: str) -> str:
    lines = []
    stages = os.path.join(out_dir, "stages.txt")
    if os.path.exists(stages):
        lines += ["stages: " + "; ".join(line.strip() for line in open(stages) if line.strip())]
    attention = _read_csv(os.path.join(out_dir, "attention.csv"))
    if attention:
        r = attention[0]
        lines.insert(0, f"{r['device']}; torch {r['torch']}; triton {r['triton']}; {r['date']}")
    lines += ["", *attention_summary(attention), "", *tune_summary(_read_csv(os.path.join(out_dir, "tune.csv")))]
    lines += ["", pytest_summary(os.path.join(out_dir, "gpu_tests.log"))]
    for r in _read_csv(os.path.join(out_dir, "train_step.csv")):
        lines.append(
            f"train step {r['variant']:9} {_float(r['step_ms']):8.1f} ms  {_float(r['time_vs_dino']):.3f}x DINO  "
            f"memory {_float(r['memory_vs_dino']):.3f}x"
        )
    lines.append(f"full logs and tables: {out_dir}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Print the short summary of a GPU check run.")
    parser.add_argument("command", choices=["summary"])
    parser.add_argument("directory")
    args = parser.parse_args(argv)
    print(summarize(args.directory))


if __name__ == "__main__":
    main()
