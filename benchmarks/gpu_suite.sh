#!/usr/bin/env bash
# Issue 13's GPU checks and measurements in one run on one H100/H200, in under 9 minutes.
#
# Here (a machine with internet), once: the wheels the GPU machine lacks, for Python 3.10-3.13
# (pytest and its dependencies, liger-kernel, sentencepiece + protobuf for the LlamaForCausalLM
# peer; all pure Python but sentencepiece). flash-attn / xformers wheels may be added by hand:
#     benchmarks/gpu_suite.sh fetch [WHEEL_DIR]            # default .whl (git-ignored)
# There (repository root; torch, lightning and transformers preinstalled; WHEEL_DIR carried):
#     benchmarks/gpu_suite.sh [OUT_DIR] [WHEEL_DIR]         # defaults: $OUT (or gpu-out), .whl
#
# Steps, each under its own time limit (BUDGET_S, default 520 s, caps the whole run; a step that
# would start with too little time left is skipped and says so). A step that fails or times out is
# recorded and the next one runs. Results: OUT_DIR/summary.txt (step, status, seconds) and per step
# a .log (and a .json from the benchmark):
#   setup     install every wheel of WHEEL_DIR that fits this Python (--no-deps, into a private dir)
#   parity    the GPU kernel tests: tests/models/test_kernels.py and test_flops.py, -m gpu (parity of
#             every installed kernel, fp32 + bf16, forward + backward; kernels absent: skipped)
#   compare   tinyllama-1.1b, seq 2048, bf16-mixed, one GPU: our default kernels beside transformers'
#             LlamaForCausalLM in the same run (tokens/s, MFU, each contender's own peak memory)
#   sweep     the largest micro-batch without activation checkpointing (default kernels)
#   kernels   one kernel-set comparison at the compare batch (sets that cannot run here: skipped)
#   curve     a short loss curve, default (fused) kernels vs eager, fp32 eager as the noise yardstick
# DRY_RUN=1 prints the steps and their limits; SMOKE=1 runs them on the CPU with a tiny model (a
# check of this script, not a measurement).
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."  # the repository root: relative OUT_DIR / WHEEL_DIR are taken from here

PY="${PYTHON:-python3}"

if [[ "${1:-}" == fetch ]]; then
  dir="${2:-.whl}"
  mkdir -p "$dir"
  common=(--no-deps --only-binary=:all: --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$dir")
  for v in 3.10 3.11 3.12 3.13; do
    "$PY" -m pip download -q "${common[@]}" --python-version "$v" sentencepiece || echo "no sentencepiece wheel for $v"
  done
  "$PY" -m pip download -q "${common[@]}" --python-version 3.12 "liger-kernel>=0.5.0" protobuf \
    pytest pluggy iniconfig pygments packaging
  ls -l "$dir"
  exit 0
fi

# `_install WHEEL_DIR SITE`: every wheel of WHEEL_DIR that fits this Python, one project at a time
# (one that fits nowhere is skipped), --no-deps, into SITE (put first on PYTHONPATH).
if [[ "${1:-}" == _install ]]; then
  wheels="$2" site="$3"
  mkdir -p "$site"
  compgen -G "$wheels/*.whl" > /dev/null || { echo "no wheels in $wheels"; exit 0; }
  for name in $(for f in "$wheels"/*.whl; do basename "$f" | cut -d- -f1; done | sort -u); do
    if "$PY" -m pip --version > /dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --find-links "$wheels" --no-deps --no-compile --upgrade \
        --target "$site" "$name" && echo "installed $name" || echo "skipped $name (no wheel fits)"
    else  # no pip here: unpack the pure-Python wheels
      for f in "$wheels/$name"-*-py3-none-any.whl; do
        [[ -e "$f" ]] && "$PY" -m zipfile -e "$f" "$site" && echo "unpacked $(basename "$f")"
      done
    fi
  done
  exit 0
fi

OUT_DIR="${1:-${OUT:-gpu-out}}"
WHEELS="${2:-${WHEELS:-.whl}}"
BUDGET_S="${BUDGET_S:-520}"
BATCH="${BATCH:-4}"
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
START=$SECONDS
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [[ "${SMOKE:-0}" == 1 ]]; then  # the plumbing on a CPU: tiny model, a few steps
  MODEL=(--model tiny --override n_layers=1 --override vocab_size=256 --device cpu --precision 32-true)
  SEQ=(--seq-len 32) CURVE_SEQ=(--seq-len 32) STEPS=(--warmup 1 --steps 2) MAXB=4 CURVE_STEPS=10
else
  MODEL=(--model tinyllama-1.1b --precision bf16-mixed)
  SEQ=(--seq-len 2048) CURVE_SEQ=(--seq-len 1024) STEPS=(--warmup 3 --steps 20) MAXB=32 CURVE_STEPS=60
fi
BENCH=("$PY" benchmarks/throughput.py "${MODEL[@]}")

# The kernel sets compared in `kernels`: each stays resident during the run (1.1B parameters with
# fp32 AdamW: about 18 GB apiece), so a GPU with less than 100 GiB compares three, not four.
KERNEL_SETS="default;baseline;attention=xformers"
gpu_gib=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**30 if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if (( gpu_gib >= 100 )) || [[ "${SMOKE:-0}" == 1 ]]; then KERNEL_SETS="$KERNEL_SETS;loss_kernel=chunked"; fi

: > "$SUMMARY"
record() { printf '%-8s %-28s %5ss\n' "$1" "$2" "$3" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, its output in OUT_DIR/NAME.log.
step() {
  local name="$1" limit="$2"
  shift 2
  local left=$(( BUDGET_S - (SECONDS - START) ))
  (( limit > left - 5 )) && limit=$(( left - 5 ))
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "step $name limit ${limit}s: $*"
    return 0
  fi
  if (( limit < 20 )); then
    record "$name" "skipped (time budget spent)" 0
    return 0
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT_DIR/$name.log"
  local t0=$SECONDS rc
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >> "$OUT_DIR/$name.log" 2>&1
  rc=$?
  tail -n 40 "$OUT_DIR/$name.log"
  case $rc in
    0) record "$name" ok $(( SECONDS - t0 )) ;;
    124|137) record "$name" "timed out after ${limit}s" $(( SECONDS - t0 )) ;;
    *) record "$name" "failed (exit $rc)" $(( SECONDS - t0 )) ;;
  esac
}

# --- setup: the wheels (see `_install` above) ----------------------------------------------------
SITE="${TMPDIR:-/tmp}/gpu-suite-site"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
step setup 40 bash "$SELF" _install "$WHEELS" "$SITE"
if [[ "${DRY_RUN:-0}" != 1 ]]; then
  {
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda)"
    "$PY" -c "from models import kernels; print('kernel libraries:', kernels.installed()); print({n: kernels.library_problem(n) for n in kernels.installed()})"
  } > "$OUT_DIR/env.txt" 2>&1
  cat "$OUT_DIR/env.txt"
fi

# --- the steps ------------------------------------------------------------------------------------
step parity 130 "$PY" -m pytest -q -ra -p no:cacheprovider -m gpu --junitxml="$OUT_DIR/parity.xml" \
  tests/models/test_kernels.py tests/models/test_flops.py
step compare 90 "${BENCH[@]}" "${SEQ[@]}" --batch "$BATCH" "${STEPS[@]}" --ours default --peers hf \
  --json "$OUT_DIR/compare.json"
step sweep 80 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "${BENCH[@]}" "${SEQ[@]}" --sweep \
  --no-kernel-search --max-batch "$MAXB" --warmup 2 --steps 8 --json "$OUT_DIR/sweep.json"
step kernels 80 "${BENCH[@]}" "${SEQ[@]}" --batch "$BATCH" --warmup 3 --steps 12 --peers none \
  --skip-unavailable --ours "$KERNEL_SETS" --json "$OUT_DIR/kernels.json"
step curve 90 "${BENCH[@]}" "${CURVE_SEQ[@]}" --batch 2 --curve "$CURVE_STEPS" --ours default \
  --json "$OUT_DIR/curve.json"

[[ "${DRY_RUN:-0}" == 1 ]] || { echo; echo "total $(( SECONDS - START ))s of ${BUDGET_S}s; figures in $OUT_DIR"; cat "$SUMMARY"; }
