#!/usr/bin/env bash
# The one GPU command: from a bare H100/H200 (no network) to a tuned, tested, recorded verdict in at
# most 7 minutes of wall time.
#   bash bench/gpu_check.sh            # everything goes to $OUT (else bench/results/<date>_<gpu>/)
#   bash bench/gpu_check.sh --dry-run  # print the stages and their budgets; run nothing
#   bash bench/gpu_check.sh --only tune summary   # run only the named stages
#
# Stages run in order, each under `timeout` (SIGTERM at its budget, SIGKILL 2 s later), each with its
# full log in OUT_DIR/<stage>.log and a status line in OUT_DIR/stages.txt. Every stage writes its
# results as it goes (the benchmark after every case, the tuner after every key), so a stage that hangs
# or is cut short loses only what it had not finished; later stages still run. The short summary is
# printed last (and kept as OUT_DIR/summary.txt). Exit status: 0 when every stage succeeded.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DRY_RUN=0
ONLY=""
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  --only) shift; ONLY=" $* " ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run | --only STAGE...]" >&2; exit 2 ;;
esac

gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
gpu_slug="$(printf '%s' "${gpu_name:-gpu}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')"
OUT_DIR="${OUT:-bench/results/$(date -u +%Y-%m-%d)_${gpu_slug}}"

# pytest-xdist and pytest-timeout are expected on the GPU machine; without them the tests run serially
# and only the stage's own timeout bounds them.
test_flags="-v -p no:cacheprovider -rfE"  # one line per test: a run cut short still shows what passed
$PY -c "import xdist" 2>/dev/null && test_flags+=" -n 4"
$PY -c "import pytest_timeout" 2>/dev/null && test_flags+=" --timeout 60"
# GPU-marked tests (real shapes, each backward variant, determinism, autotune with a few configs, the
# interpreter's cases in bf16 last), plus the fp32 accuracy and head-dim tests, which run on CUDA too;
# then the ViT's gradients through the kernel and the fused loss's rows at the paper's head size.
tests="tests/test_triton_attention.py tests/test_model.py tests/test_fused_loss.py"
tests+=" -k 'gpu or fp32_attention or head_dims'"

# name | budget in seconds | command. Budgets sum to 402 s; with the kill grace, at most 418 s.
# install: no network on the GPU machine (--no-index), and no pip self-version check retrying inside the
# 20 s. benchmark: --budget_s leaves 30 s for the first flex compile; later flex cases start only when
# the slowest so far still fits. train_step: the slow reference variant is left out; dino first (the
# ratios are to it), then triton_fused (the fused-loss target).
STAGES=(
  "install|20|$PY -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -q -e ."
  "versions|10|$PY -c 'import torch, triton, timm; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, timm.__version__)'; nvidia-smi"
  "precompile|55|$PY -m bench.tune --precompile_only --jobs 16"
  "benchmark|112|$PY -m bench.attention --rules prefix+raw raw+self --dtypes bf16 --modes fwd fwd+bwd --budget_s 82 --output_dir '$OUT_DIR'"
  "tune|85|$PY -m bench.tune --skip_precompile --budget_s 70 --output_dir '$OUT_DIR'"
  "gpu_tests|70|$PY -m pytest $tests $test_flags"
  "train_step|40|$PY -m bench.train_step --steps 10 --variants dino triton_fused triton dino_fused sdpa --output_dir '$OUT_DIR'"
  "summary|10|$PY -m bench.report summary '$OUT_DIR'"
)
BUDGET_LIMIT_S=420

total=0
for stage in "${STAGES[@]}"; do
  IFS='|' read -r _ budget _ <<< "$stage"
  total=$((total + budget))
done
if ((total + 2 * ${#STAGES[@]} > BUDGET_LIMIT_S)); then
  echo "stage budgets sum to ${total} s (+2 s kill grace each): over the ${BUDGET_LIMIT_S} s limit" >&2
  exit 2
fi

if ((DRY_RUN)); then
  echo "output: $OUT_DIR"
  for stage in "${STAGES[@]}"; do
    IFS='|' read -r name budget command <<< "$stage"
    printf '%-11s %4d s  %s\n' "$name" "$budget" "$command"
  done
  echo "total: ${total} s of ${BUDGET_LIMIT_S} s"
  exit 0
fi

mkdir -p "$OUT_DIR"
: > "$OUT_DIR/stages.txt"
status=0
for stage in "${STAGES[@]}"; do
  IFS='|' read -r name budget command <<< "$stage"
  [[ -n "$ONLY" && "$ONLY" != *" $name "* ]] && continue
  start=$(date +%s)
  if [[ "$name" == "summary" ]]; then
    timeout -k 2 "$budget" bash -c "$command" 2>&1 | tee "$OUT_DIR/summary.txt"
    rc=${PIPESTATUS[0]}
  else
    timeout -k 2 "$budget" bash -c "$command" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
  fi
  took=$(($(date +%s) - start))
  if [[ "$name" == "install" ]] && ! $PY -c "import adclr.kernels" 2>/dev/null; then
    # pip could not install the package (no offline build backend?): map adclr.kernels to kernels/ the
    # way the editable install does, with a one-line .pth finder; adclr itself comes from the checkout.
    site="$($PY -c 'import site; print(site.getsitepackages()[0])')"
    echo "import sys; sys.meta_path.append(type('AdclrCheckout', (), {'find_spec': classmethod(lambda c, n, p=None, t=None: __import__('importlib.machinery').machinery.PathFinder.find_spec(n, ['$PWD']) if n == 'adclr.kernels' else None)}))" > "$site/adclr_checkout.pth"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "install: pip failed; adclr.kernels mapped to $PWD/kernels by $site/adclr_checkout.pth" >> "$OUT_DIR/install.log"
  fi
  case $rc in
    0) result="ok" ;;
    124 | 137) result="TIMEOUT" ;;
    *) result="FAILED (exit $rc)" ;;
  esac
  ((rc != 0)) && status=1
  line="$name $result ${took}/${budget} s"
  echo "$line" >> "$OUT_DIR/stages.txt"
  [[ "$name" != "summary" ]] && echo "$line: $(tail -n 1 "$OUT_DIR/$name.log" 2>/dev/null | cut -c1-150)"
done
# The tuned table for this GPU, to check in as kernels/tiles/<gpu>.json, is under $OUT_DIR/tiles/.
exit $status
