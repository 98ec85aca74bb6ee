#!/usr/bin/env bash
# The one GPU command: install without network, run the GPU tests and both benchmarks, print a summary.
#   bash bench/gpu_check.sh            (at most 8 minutes on one H100/H200; writes under $OUT or bench/results/)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results}/$(date -u +%Y-%m-%d)_gpu-check"
mkdir -p "$OUT_DIR"
python3 -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | tail -n 2
python3 - <<'PY' | tee "$OUT_DIR/versions.txt"
import torch, triton, timm
print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  timm {timm.__version__}")
PY

status=0
# Budget (one H100/H200, 8 minutes in all): GPU tests 3.5 min, kernel benchmark 3 min, train step 1 min.
timeout 210 python3 -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tail -n 25 | tee "$OUT_DIR/gpu_tests.txt" || status=1
timeout 180 python3 -m bench.attention --rules prefix+raw raw+self --dtypes bf16 --output_dir "$OUT_DIR" 2>&1 | tail -n 3 || status=1
timeout 70 python3 -m bench.train_step --steps 10 --output_dir "$OUT_DIR" 2>&1 | tail -n 3 || status=1

python3 - "$OUT_DIR" <<'PY'
import csv, os, sys
out = sys.argv[1]
path = os.path.join(out, "attention.csv")
if os.path.exists(path):
    rows = list(csv.DictReader(open(path)))
    print(f"\n{rows[0]['device']}  torch {rows[0]['torch']}  triton {rows[0]['triton']}")
    print(f"{'shape':18} {'rule':16} {'dtype':5} {'mode':8} " + " ".join(f"{p:>11}" for p in ("ours", "sdpa_mask", "sdpa_sliced", "flex", "paper", "full_sdpa")))
    cases = {}
    for r in rows:
        cases.setdefault((r["shape"], r["rule"], r["dtype"], r["mode"]), {})[r["provider"]] = float(r["ms"])
    for (shape, rule, dtype, mode), t in cases.items():
        cells = " ".join(f"{t[p]:8.3f}ms" if p in t else f"{'—':>11}" for p in ("ours", "sdpa_mask", "sdpa_sliced", "flex", "paper", "full_sdpa"))
        print(f"{shape:18} {rule:16} {dtype:5} {mode:8} {cells}")
path = os.path.join(out, "train_step.csv")
if os.path.exists(path):
    print()
    for r in csv.DictReader(open(path)):
        print(f"train step {r['variant']:9} {float(r['step_ms']):8.1f} ms  {float(r['time_vs_dino']):.3f}x DINO  "
              f"memory {float(r['memory_vs_dino']):.3f}x")
PY
exit $status
