#!/usr/bin/env bash
# Issue 7's GPU measurements in a few commands, for one H100/H200 (each step fits one 10-minute call).
#
# Here (a machine with internet), once: fetch the optional kernel library as a wheel for the GPU
# machine's Python (3.12); liger-kernel needs only torch and triton, which that image has:
#     benchmarks/gpu_suite.sh fetch
# There (in the repository root, `.whl` carried), one step per call; figures land in $OUT (or ./gpu-out):
#     benchmarks/gpu_suite.sh parity     # kernel parity tests on CUDA (fp32 + bf16, fwd + bwd)
#     benchmarks/gpu_suite.sh compare    # tinyllama-1.1b, seq 2048, bf16: kernel sets beside LlamaForCausalLM
#     benchmarks/gpu_suite.sh sweep      # largest micro-batch without checkpointing, best kernel set
#     benchmarks/gpu_suite.sh curve      # 200-step loss curves: fused vs eager, fp32 eager as noise yardstick
set -euo pipefail
cd "$(dirname "$0")/.."
step="${1:?usage: gpu_suite.sh fetch|parity|compare|sweep|curve}"
out="${OUT:-gpu-out}"
mkdir -p "$out"

if [[ "$step" == fetch ]]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "liger-kernel>=0.4"
  ls -l .whl
  exit 0
fi

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
bench=(python3 benchmarks/throughput.py --model tinyllama-1.1b --seq-len 2048 --precision bf16-mixed)

case "$step" in
  parity)
    python3 -m pytest -q -ra -p no:cacheprovider tests/models/test_kernels.py 2>&1 | tee "$out/parity.log" ;;
  compare)
    # Every kernel set that runs there, beside transformers' LlamaForCausalLM (sdpa) in the same run.
    "${bench[@]}" --batch 8 --steps 30 --peers hf \
      --ours "default;baseline;loss_kernel=liger_fused;rmsnorm_kernel=liger,swiglu_kernel=liger,rope_kernel=liger,loss_kernel=liger_fused;compile=true" \
      --json "$out/compare.json" 2>&1 | tee "$out/compare.log" ;;
  sweep)
    "${bench[@]}" --sweep --steps 20 --max-batch 32 --json "$out/sweep.json" 2>&1 | tee "$out/sweep.log" ;;
  curve)
    "${bench[@]}" --curve 200 --batch 4 --ours "default" --json "$out/curve.json" 2>&1 | tee "$out/curve.log" ;;
  *)
    echo "unknown step $step" >&2; exit 2 ;;
esac
