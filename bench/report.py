"""Benchmark output: one folder per run with a Markdown table, a CSV and (with matplotlib) a PNG plot,
each stamped with the device, torch and triton versions and the date."""

from __future__ import annotations

import csv
import datetime
import math
import os
import re

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_stamp(device: torch.device) -> dict:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


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
        slug = re.sub(r"[^a-z0-9]+", "-", self.stamp["device"].lower()).strip("-")
        self.output_dir = output_dir or os.path.join(RESULTS, f"{datetime.date.today().isoformat()}_{slug}")

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
            columns = list(self.rows[0])
            lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_fmt(r[c]) for c in columns) + " |" for r in self.rows]
        if self.notes:
            lines += ["", "Notes:", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"

    def write(self, plot_x: str | None = None) -> str:
        os.makedirs(self.output_dir, exist_ok=True)
        base = os.path.join(self.output_dir, self.name)
        self._plot(base + ".png", plot_x)  # first: a missing matplotlib adds a note to the table
        with open(base + ".md", "w") as f:
            f.write(self.markdown())
        if self.rows:
            with open(base + ".csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["device", "torch", "triton", "date", *self.rows[0]])
                writer.writeheader()
                writer.writerows({**self.stamp, **r} for r in self.rows)
        return self.output_dir

    def _plot(self, path: str, x: str | None) -> None:
        """Bars of median ms per provider for each case (or lines over ``x`` for a sweep)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
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
