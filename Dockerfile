# GPU image for cluster runs: CUDA PyTorch base + this project (flash-attn etc. as optional extras).
#   docker build -t orchestrator .
#   docker run --gpus all -v /data:/data orchestrator train --config configs/tinyllama-1.1b.yaml
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel
WORKDIR /workspace/orchestrator
ENV PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
COPY pyproject.toml README.md ./
COPY orchestrator orchestrator
COPY models models
COPY data data
COPY configs configs
COPY cluster cluster
# torch comes from the base image; pip keeps it (the constraint pins the installed version).
RUN python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /tmp/constraints.txt \
 && pip install --no-cache-dir -c /tmp/constraints.txt -e . \
 && (pip install --no-cache-dir -c /tmp/constraints.txt ".[gpu]" || echo "GPU extras unavailable; falling back to PyTorch SDPA")
ENTRYPOINT ["python", "-m", "orchestrator"]
