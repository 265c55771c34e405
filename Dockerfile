# GPU image for cluster runs: CUDA PyTorch + DeepSpeed + this project + liger-kernel. See README
# "Containers" for Slurm (pyxis/enroot, Apptainer).
#
#   docker build -t orchestrator .                       # torch 2.11, CUDA 13: SDPA + liger-kernel
#   docker run --gpus all --ipc=host -v /data:/data orchestrator train --config configs/tinyllama-1.1b.yaml
#
# The default is the stack the GPU suite (benchmarks/gpu_suite.py) runs on: torch 2.11 + CUDA 13,
# attention through PyTorch's SDPA (its CUDA flash backend is FlashAttention-2). The devel base has
# nvcc, which DeepSpeed's JIT-built ops need. Its torch must satisfy pyproject.toml's floor
# (torch>=2.6; checked below and by tests/models/test_torch_support.py).
ARG BASE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-devel
FROM ${BASE}

# liger-kernel: pure Python (Triton kernels), so it runs on any CUDA the base's Triton supports;
# `auto` picks it for the norms, RoPE, SwiGLU and the fused loss.
ARG LIGER=1
# flash-attn and xformers ship compiled ops for particular torch / CUDA builds, and neither has
# them for torch 2.11 + CUDA 13 (flash-attn has no wheel; xformers' ops need CUDA 12's runtime and
# fall back to PyTorch). Opt in with a base they have wheels for, e.g.
#   docker build --build-arg BASE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-devel \
#       --build-arg FLASH_ATTN=1 --build-arg XFORMERS=1 -t orchestrator:flash .
# flash-attn 2.7.4.post1 ships prebuilt wheels for torch 2.6 / CUDA 12 / Python 3.11 (xformers'
# builds for torch 2.6, 0.0.29.post2/3, bundle their own FlashAttention and ignore it). Another
# BASE needs a FLASH_ATTN_VERSION with wheels for its torch (or a slow source build), and one inside
# the range its xformers names (0.0.32 refuses to import beside a flash-attn outside 2.7.1-2.8.2).
ARG FLASH_ATTN=0
ARG FLASH_ATTN_VERSION=2.7.4.post1
ARG XFORMERS=0
# DS_BUILD_OPS=0: DeepSpeed compiles the ops it needs on first use instead of at install time.
# MAX_JOBS bounds a flash-attn source build (only when no prebuilt wheel matches torch/CUDA/Python).
ENV PYTHONUNBUFFERED=1 \
    DS_BUILD_OPS=0 \
    MAX_JOBS=8 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /workspace/orchestrator

# Keep the base image's torch (and its CUDA build): every install below is constrained to it.
RUN python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /etc/pip-constraints.txt \
 && (python -c "import triton; print('triton==' + triton.__version__)" >> /etc/pip-constraints.txt || true) \
 && cat /etc/pip-constraints.txt
ENV PIP_CONSTRAINT=/etc/pip-constraints.txt

# Dependencies first (a layer that survives code edits): the project's requirements from pyproject.toml.
# A base image whose torch or Python is below the project's floor stops the build here, saying so.
COPY pyproject.toml README.md ./
RUN python -c "import re, sys, tomllib, torch; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
floor = [d.split('>=')[1] for d in p['dependencies'] if d.startswith('torch>=')][0]; \
v = lambda s: tuple(int(x) for x in re.findall(r'\d+', s)[:2]); \
print('base image: torch', torch.__version__, 'Python', sys.version.split()[0], '| project: torch>=' + floor, 'Python', p['requires-python']); \
sys.exit(0 if v(torch.__version__) >= v(floor) and sys.version_info[:2] >= v(p['requires-python']) else 'the base image is below the project floor: pick another BASE')"
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# The GPU extras, each pinned by the constraint to builds for the image's torch. flash-attn's
# setup downloads a prebuilt wheel for this torch/CUDA/Python (or compiles; slow) and needs torch
# at build time, hence --no-build-isolation.
RUN if [ "$LIGER" = "1" ]; then pip install "liger-kernel>=0.5.0"; fi \
 && if [ "$FLASH_ATTN" = "1" ]; then \
      pip install packaging ninja \
   && pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"; \
    fi \
 && if [ "$XFORMERS" = "1" ]; then pip install "xformers>=0.0.29.post2"; fi \
 && (pip show liger-kernel flash-attn xformers 2>/dev/null | grep -E "^(Name|Version)" || true)

COPY orchestrator orchestrator
COPY models models
COPY data data
COPY configs configs
COPY cluster cluster
RUN pip install --no-deps -e . \
 && python -c "import torch, lightning_fabric, deepspeed, litdata, orchestrator.train; print('orchestrator image ok: torch', torch.__version__, 'CUDA', torch.version.cuda)"

# `docker run IMAGE train ...`. Slurm container runtimes (pyxis/enroot, Apptainer) ignore the
# entrypoint and run the command given to srun, e.g. `python -m orchestrator train ...`.
ENTRYPOINT ["python", "-m", "orchestrator"]
CMD ["--help"]
