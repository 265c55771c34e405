#!/usr/bin/env bash
# The GPU suite (benchmarks/gpu_suite.py: steps, limits, results). Here, once: `PYTHON=.venv/bin/python
# benchmarks/gpu_suite.sh fetch` (the wheels and sample corpus to carry: .cache/gpu-suite); on the GPU
# machine: `benchmarks/gpu_suite.sh [OUT_DIR]`; SMOKE=1 runs every step on the CPU, DRY_RUN=1 prints them.
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_suite.py" "$@"
