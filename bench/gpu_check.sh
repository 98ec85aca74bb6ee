#!/usr/bin/env bash
# The one GPU command: from a bare H100/H200 (no network) to a tuned, tested, recorded verdict in at
# most 400 s of wall time, imports, nvidia-smi and installs included.
#   bash bench/gpu_check.sh                      # results to $OUT (else bench/results/<date>_<gpu>/)
#   bash bench/gpu_check.sh --wheels DIR         # install missing or too old packages from DIR, offline
#   bash bench/gpu_check.sh --dry-run            # the budget table; packs a stub archive + summary
#   bash bench/gpu_check.sh --only tune summary  # run only the named stages
#   PYTHON=/path/to/python bash bench/gpu_check.sh   # the interpreter (default: python3 on PATH)
#
# What comes back is two files in OUT_DIR: gpu_check.tar.gz (every stage's log and results, the tuned
# table under tiles/; it unpacks to gpu_check/) and summary.txt (the short verdict, also printed
# last). Stages write into one scratch folder; the archive is re-packed after every stage and on
# SIGTERM/SIGINT/exit (a trap), so a run killed at its time limit still returns what it finished.
# Each stage runs under `timeout` (SIGTERM at its budget, SIGKILL 2 s later); its start and elapsed
# time are printed and recorded in stages.txt. Exit status: 0 when every stage succeeded.
#
# Versions: torch (with CUDA), triton >= 3.6, timm >= 1.0.23 and pytest are checked first. Where one is
# missing or too old and --wheels DIR is given, it is installed from DIR with pip --no-index (no
# network); one line says what was used. To prepare DIR on a machine with network, for the GPU
# machine's Python (3.12, x86-64 here):
#   python3 -m pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d wheels 'triton>=3.6' 'timm>=1.0.23' pytest pytest-xdist pytest-timeout
# (--no-deps: name each missing dependency too, e.g. timm's huggingface_hub and safetensors).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DRY_RUN=0
ONLY=""
WHEELS=""
usage="usage: bash bench/gpu_check.sh [--dry-run] [--wheels DIR] [--only STAGE...]"
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --wheels)
      [[ $# -ge 2 && -d "$2" ]] || { echo "error: --wheels needs an existing folder of wheels; $usage" >&2; exit 2; }
      WHEELS="$(cd "$2" && pwd)"; shift 2 ;;
    --only) shift; ONLY=" $* "; break ;;
    *) echo "error: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
done

T0=$(date +%s)
elapsed() { echo $(($(date +%s) - T0)); }
gpu_name="$(timeout 5 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
gpu_slug="$(printf '%s' "${gpu_name:-gpu}" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')"
OUT_DIR="${OUT:-bench/results/$(date -u +%Y-%m-%d)_${gpu_slug}}"
SCRATCH_PARENT="$(mktemp -d)"
WORK="$SCRATCH_PARENT/gpu_check"  # every stage's output; packed into OUT_DIR/gpu_check.tar.gz
mkdir -p "$WORK"

# pytest-xdist and pytest-timeout are used when present; without them the tests run serially and only
# the stage's own timeout bounds them.
test_flags="-v -p no:cacheprovider -rfE"  # one line per test: a run cut short still shows what passed
# GPU-marked tests (real shapes, each backward variant, determinism, autotune with a few configs, the
# interpreter's cases in bf16 last), plus the fp32 accuracy, head-dim and hidden-key tests, which run on
# CUDA too; then the ViT's gradients through the kernel and the fused loss's rows at the paper's head size.
tests="tests/test_triton_attention.py tests/test_model.py tests/test_fused_loss.py"
tests+=" -k 'gpu or fp32_attention or head_dims or hidden_keys'"
# The version check (and the offline installs it may need): prints one line, fails without CUDA.
versions="$PYTHON -m bench.versions${WHEELS:+ --wheels '$WHEELS'}"

# name | budget in seconds | command. install: no network on the GPU machine (--no-index), no pip
# self-version check. benchmark: --budget_s leaves 30 s for the first flex compile; later flex cases
# start only when the slowest so far still fits. train_step: the slow reference variant is left out;
# dino first (the ratios are to it), then triton_fused (the fused-loss target).
STAGES=(
  "versions|15|$versions && nvidia-smi"
  "install|15|$PYTHON -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -q -e ."
  "precompile|50|$PYTHON -m bench.tune --precompile_only --jobs 16"
  "benchmark|95|$PYTHON -m bench.attention --rules prefix+raw raw+self --dtypes bf16 --modes fwd fwd+bwd --budget_s 65 --output_dir '$WORK'"
  "tune|75|$PYTHON -m bench.tune --skip_precompile --budget_s 60 --output_dir '$WORK'"
  "gpu_tests|65|$PYTHON -m pytest $tests $test_flags"
  "train_step|40|$PYTHON -m bench.train_step --steps 10 --variants dino triton_fused triton dino_fused sdpa --output_dir '$WORK'"
  "summary|10|$PYTHON -m bench.report summary '$WORK'"
)
KILL_GRACE_S=2    # timeout -k: SIGKILL this long after a stage's SIGTERM
PREAMBLE_S=5      # nvidia-smi's name query, the pytest plugin checks
ARCHIVE_S=5       # packing the archive and the summary
BUDGET_LIMIT_S=400

total=$((PREAMBLE_S + ARCHIVE_S))
for stage in "${STAGES[@]}"; do
  IFS='|' read -r _ budget _ <<< "$stage"
  total=$((total + budget + KILL_GRACE_S))
done
if ((total > BUDGET_LIMIT_S)); then
  echo "error: the budget sums to ${total} s: over the ${BUDGET_LIMIT_S} s limit" >&2
  exit 2
fi

STAGE_PID=""
CURRENT=""
SUMMARY_DONE=0

pack() {
  # The archive, replaced atomically: a kill during packing leaves the previous one.
  mkdir -p "$OUT_DIR"
  tar -czf "$OUT_DIR/gpu_check.tar.gz.tmp" -C "$SCRATCH_PARENT" gpu_check 2>/dev/null &&
    mv -f "$OUT_DIR/gpu_check.tar.gz.tmp" "$OUT_DIR/gpu_check.tar.gz"
}

finish() {
  # On exit, however it comes: stop a running stage, write a summary if the summary stage did not,
  # pack the archive last-minute, remove the scratch folder.
  trap - EXIT TERM INT
  if [[ -n "$STAGE_PID" ]] && kill -0 "$STAGE_PID" 2>/dev/null; then
    kill -TERM "$STAGE_PID" 2>/dev/null
    echo "$CURRENT CUT_SHORT (the script was stopped at +$(elapsed) s)" >> "$WORK/stages.txt"
  fi
  if ((!SUMMARY_DONE)); then
    {
      echo "gpu_check cut short at +$(elapsed) s${CURRENT:+, during stage $CURRENT}; stages:"
      cat "$WORK/stages.txt" 2>/dev/null
      [[ -n "$CURRENT" ]] && tail -n 5 "$WORK/$CURRENT.log" 2>/dev/null
    } > "$WORK/summary.txt"
  fi
  echo "archive: $OUT_DIR/gpu_check.tar.gz (unpacks to gpu_check/)" >> "$WORK/summary.txt"
  cp "$WORK/summary.txt" "$OUT_DIR/summary.txt" 2>/dev/null || { mkdir -p "$OUT_DIR"; cp "$WORK/summary.txt" "$OUT_DIR/summary.txt"; }
  pack
  ((!SUMMARY_DONE)) && cat "$OUT_DIR/summary.txt"
  rm -rf "$SCRATCH_PARENT"
}
trap finish EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

: > "$WORK/stages.txt"
printf '%-11s %6s  %s\n' stage budget command > "$WORK/budget.txt"
printf '%-11s %4d s\n' preamble "$PREAMBLE_S" >> "$WORK/budget.txt"
for stage in "${STAGES[@]}"; do
  IFS='|' read -r name budget command <<< "$stage"
  printf '%-11s %4d s  %s\n' "$name" "$budget" "$command" >> "$WORK/budget.txt"
done
printf '%-11s %4d s\n' "kill grace" $((KILL_GRACE_S * ${#STAGES[@]})) >> "$WORK/budget.txt"
printf '%-11s %4d s\n' archive "$ARCHIVE_S" >> "$WORK/budget.txt"
echo "total: ${total} s of ${BUDGET_LIMIT_S} s" >> "$WORK/budget.txt"
echo "output: $OUT_DIR/gpu_check.tar.gz and $OUT_DIR/summary.txt; interpreter: $PYTHON"
cat "$WORK/budget.txt"

if ((DRY_RUN)); then
  for stage in "${STAGES[@]}"; do
    IFS='|' read -r name budget _ <<< "$stage"
    echo "$name dry-run 0/${budget} s" >> "$WORK/stages.txt"
  done
  { echo "gpu_check dry run: nothing was run"; cat "$WORK/stages.txt"; } > "$WORK/summary.txt"
  SUMMARY_DONE=1
  exit 0
fi

"$PYTHON" -c "import xdist" 2>/dev/null && test_flags+=" -n 4"
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && test_flags+=" --timeout 60"
status=0
for stage in "${STAGES[@]}"; do
  IFS='|' read -r name budget command <<< "$stage"
  [[ -n "$ONLY" && "$ONLY" != *" $name "* ]] && continue
  [[ "$name" == gpu_tests ]] && command="$PYTHON -m pytest $tests $test_flags"  # with the plugins found
  start=$(date +%s)
  CURRENT="$name"
  echo "[+$(elapsed) s] $name: start (budget $budget s)"
  # In the background, so that a signal to this script runs its trap at once, not after the stage.
  if [[ "$name" == "summary" ]]; then
    timeout -k "$KILL_GRACE_S" "$budget" bash -c "$command" > "$WORK/summary.txt" 2>&1 &
  else
    timeout -k "$KILL_GRACE_S" "$budget" bash -c "$command" > "$WORK/$name.log" 2>&1 &
  fi
  STAGE_PID=$!
  wait "$STAGE_PID"
  rc=$?
  STAGE_PID=""
  CURRENT=""
  took=$(($(date +%s) - start))
  if [[ "$name" == "install" ]] && ! "$PYTHON" -c "import adclr.kernels" 2>/dev/null; then
    # pip could not install the package (no offline build backend?): map adclr.kernels to kernels/ the
    # way the editable install does, with a one-line .pth finder; adclr itself comes from the checkout.
    site="$("$PYTHON" -c 'import site; print(site.getsitepackages()[0])')"
    echo "import sys; sys.meta_path.append(type('AdclrCheckout', (), {'find_spec': classmethod(lambda c, n, p=None, t=None: __import__('importlib.machinery').machinery.PathFinder.find_spec(n, ['$PWD']) if n == 'adclr.kernels' else None)}))" > "$site/adclr_checkout.pth"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "install: pip failed; adclr.kernels mapped to $PWD/kernels by $site/adclr_checkout.pth" >> "$WORK/install.log"
  fi
  case $rc in
    0) result="ok" ;;
    124 | 137) result="TIMEOUT" ;;
    *) result="FAILED (exit $rc)" ;;
  esac
  ((rc != 0)) && status=1
  line="$name $result ${took}/${budget} s"
  echo "$line" >> "$WORK/stages.txt"
  if [[ "$name" == "summary" ]]; then
    SUMMARY_DONE=1
    cat "$WORK/summary.txt"
  else
    echo "[+$(elapsed) s] $line: $(tail -n 1 "$WORK/$name.log" 2>/dev/null | cut -c1-150)"
  fi
  pack
done
exit $status
