"""ADCLR against DINO at equal iterations: what the query branch buys, over seeds, with random init beside.

    python -m bench.learning                                  # 3 seeds, the built-in preset, CPU is fine
    python -m bench.learning --seeds 0 1 2 3 4 --split holdout -- --lambda_query 1.0   # choosing settings

For each seed it runs ``train.py`` twice with every flag equal but ``--num_query``: ADCLR (the preset's
query crops) and DINO (``--num_query 0``), each evaluating the teacher every ``--eval_every`` epochs on
the built-in scenes (weighted k-NN on the CLS token, the linear dense probe's mIoU on the patch tokens).
Random init is the same architecture from the same seed, evaluated by the ADCLR run. Scores come from
the ``test`` split, or from ``holdout`` (train-distribution scenes no run trains on) when choosing
settings: settings are chosen there, never on test.

Writes, under ``--output_dir`` (default ``bench/results/<date>_<device>_learning``): ``learning.md``
(mean ± standard deviation over seeds per method, the per-seed ADCLR - DINO differences with their
mean and standard error, the final CLS loss against ln K), ``learning.png`` (both metrics and the CLS
loss per epoch, mean ± std bands) and ``learning.json`` (every run's log). Flags after ``--`` go to every run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

METHODS = ("adclr", "dino")
METRICS = {"knn_top1": "k-NN top-1 (%)", "dense_miou": "dense probe mIoU (%)"}
TINY_FLAGS = [  # a smoke test of the harness: seconds, not learning
    "--epochs", "2", "--builtin_train_size", "48", "--builtin_test_size", "24", "--batch_size_per_gpu", "16",
    "--local_crops_number", "1", "--out_dim", "32", "--head_hidden_dim", "32", "--num_workers", "0",
]  # fmt: skip


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def summarise(runs: dict, seeds: list[int]) -> dict:
    """Final metrics per method and seed, and the paired ADCLR - DINO differences."""
    final = {}
    for metric in METRICS:
        per_method = {m: [runs[m][s][-1][f"{metric}_teacher"] for s in seeds] for m in METHODS}
        per_method["random_init"] = [runs["adclr"][s][-1][f"{metric}_random_init"] for s in seeds]
        differences = [a - d for a, d in zip(per_method["adclr"], per_method["dino"])]
        mean, std = mean_std(differences)
        final[metric] = {
            **{m: dict(zip(seeds, v)) for m, v in per_method.items()},
            "difference": {"mean": mean, "std": std, "stderr": std / math.sqrt(len(seeds))},
        }
    final["cls_loss"] = {m: {s: runs[m][s][-1]["cls"] for s in seeds} for m in METHODS}
    return final


def markdown(final: dict, seeds: list[int], header: list[str], out_dim: int) -> str:
    def cell(values: dict) -> str:
        mean, std = mean_std(list(values.values()))
        return f"{mean:.1f} ± {std:.1f}"

    lines = [
        *header,
        "",
        f"| method | {' | '.join(METRICS.values())} | final CLS loss (ln K = {math.log(out_dim):.2f}) |",
    ]
    lines.append("|---|" + "---|" * (len(METRICS) + 1))
    for method in (*METHODS, "random_init"):
        loss = cell(final["cls_loss"][method]) if method in final["cls_loss"] else "—"
        lines.append(f"| {method} | " + " | ".join(cell(final[m][method]) for m in METRICS) + f" | {loss} |")
    lines += ["", "ADCLR − DINO, paired by seed (mean ± standard error; 'clear' when the mean exceeds twice it):", ""]
    for metric, name in METRICS.items():
        diff = final[metric]["difference"]
        per_seed = ", ".join(f"{final[metric]['adclr'][s] - final[metric]['dino'][s]:+.1f}" for s in seeds)
        verdict = "clear" if diff["mean"] > 2 * diff["stderr"] else "not clear"
        lines.append(f"- {name}: {diff['mean']:+.1f} ± {diff['stderr']:.1f} ({verdict}; per seed {per_seed})")
    return "\n".join(lines) + "\n"


def plot(runs: dict, seeds: list, path: str, out_dim: int) -> None:
    """Both metrics per evaluated epoch and the CLS loss per epoch (against ln K, where a collapsed run
    ends), mean ± std over seeds, per method; random init as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {**{f"{metric}_teacher": name for metric, name in METRICS.items()}, "cls": "CLS loss"}
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), constrained_layout=True)
    for ax, (key, name) in zip(axes, panels.items()):
        for method, colour in zip(METHODS, ("tab:red", "tab:blue")):
            epochs = [r["epoch"] for r in runs[method][seeds[0]] if key in r]
            values = [[r[key] for r in runs[method][s] if key in r] for s in seeds]
            stats = [mean_std([v[i] for v in values]) for i in range(len(epochs))]
            mean = [m for m, _ in stats]
            spread = [0 if math.isnan(s) else s for _, s in stats]
            ax.plot(epochs, mean, "o-", color=colour, label=method.upper())
            ax.fill_between(
                epochs,
                [m - s for m, s in zip(mean, spread)],
                [m + s for m, s in zip(mean, spread)],
                color=colour,
                alpha=0.2,
            )
        if key == "cls":
            ax.axhline(math.log(out_dim), color="black", linestyle=":", label="ln K (collapse)")
        else:
            baseline = statistics.fmean(runs["adclr"][s][-1][key.replace("_teacher", "_random_init")] for s in seeds)
            ax.axhline(baseline, color="grey", linestyle="--", label="random init")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.legend()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split", choices=("test", "holdout"), default="test", help="scenes the metrics come from")
    parser.add_argument("--eval_every", type=int, default=4, help="epochs between evaluations (curves)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores / jobs threads)")
    parser.add_argument("--output_dir", help="default: bench/results/<date>_<device>_learning")
    parser.add_argument("--tiny", action="store_true", help="a smoke test of the harness (seconds)")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.eval_every < 1 or args.jobs < 1 or len(set(args.seeds)) != len(args.seeds):
        parser.error("--eval_every and --jobs must be >= 1 and --seeds distinct")
    date = datetime.date.today().isoformat()
    output_dir = args.output_dir or os.path.join("bench", "results", f"{date}_cpu_learning")
    os.makedirs(output_dir, exist_ok=True)
    flags = [*(TINY_FLAGS if args.tiny else []), "--eval_every", str(args.eval_every)]
    flags += ["--builtin_eval_split", args.split, *extra]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // args.jobs)

    jobs = [(m, s) for s in args.seeds for m in METHODS]
    runs: dict = {m: {} for m in METHODS}
    tic = time.perf_counter()
    running: list = []
    while jobs or running:
        while jobs and len(running) < args.jobs:
            method, seed = jobs.pop(0)
            run_dir = os.path.join(output_dir, "runs", f"{method}_seed{seed}")
            os.makedirs(os.path.dirname(run_dir), exist_ok=True)
            run_flags = [*flags, "--seed", str(seed), *(["--num_query", "0"] if method == "dino" else [])]
            running.append((method, seed, run_dir, _start(run_dir, run_flags, threads)))
        method, seed, run_dir, process = running.pop(0)
        if process.wait() != 0:
            raise SystemExit(f"{method} seed {seed} failed; see {run_dir}.log")
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            runs[method][seed] = [json.loads(line) for line in f]
        print(f"{method} seed {seed}: done ({time.perf_counter() - tic:.0f} s so far)", flush=True)

    final = summarise(runs, args.seeds)
    import torch  # versions for the record

    with open(os.path.join(output_dir, "runs", f"adclr_seed{args.seeds[0]}.log")) as f:
        preset_line = next((line.strip() for line in f if line.startswith("preset ")), "")
    header = [
        f"# ADCLR against DINO on the built-in scenes ({args.split} split), {len(args.seeds)} seeds",
        "",
        f"Date {date}; {platform.machine()} CPU, {cores} cores, {args.jobs} run(s) at a time; "
        f"torch {torch.__version__}; Python {platform.python_version()}. Wall time {time.perf_counter() - tic:.0f} s.",
        f"Command: `python -m bench.learning {' '.join(argv)}`. DINO = the same runs with `--num_query 0`.",
        f"Runs: {preset_line}",
    ]
    with open(os.path.join(output_dir, "learning.md"), "w") as f:
        f.write(markdown(final, args.seeds, header, _out_dim(output_dir, args.seeds[0])))
        f.write("\n![metrics per epoch](learning.png)\n")
    with open(os.path.join(output_dir, "learning.json"), "w") as f:
        json.dump({"final": final, "runs": runs, "flags": flags, "split": args.split}, f, indent=1)
    plot(runs, args.seeds, os.path.join(output_dir, "learning.png"), _out_dim(output_dir, args.seeds[0]))
    print(open(os.path.join(output_dir, "learning.md")).read())


def _start(run_dir: str, flags: list[str], threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    log = open(run_dir + ".log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, os.path.join(root, "train.py"), "--output_dir", run_dir, *flags],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _out_dim(output_dir: str, seed: int) -> int:
    with open(os.path.join(output_dir, "runs", f"adclr_seed{seed}.log")) as f:
        for line in f:
            if line.startswith("config: "):
                return json.loads(line[len("config: ") :])["model"]["out_dim"]
    raise ValueError("no config line in the run's log")


if __name__ == "__main__":
    main()
