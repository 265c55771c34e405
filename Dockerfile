# GPU image for cluster runs: CUDA PyTorch + DeepSpeed + this project + the GPU extras
# (flash-attn, xformers, liger-kernel). See README "Containers" for Slurm (pyxis/enroot, Apptainer).
#
#   docker build -t orchestrator .                       # GPU extras included
#   docker build --build-arg GPU_EXTRAS=0 -t orchestrator .   # without them (PyTorch SDPA)
#   docker run --gpus all --ipc=host -v /data:/data orchestrator train --config configs/tinyllama-1.1b.yaml
#
# The devel base has nvcc, which DeepSpeed's JIT-built ops and a flash-attn source build need.
# Its torch must satisfy pyproject.toml's floor (torch>=2.6: FSDP2's public fully_shard and more;
# checked below and by tests/models/test_torch_support.py). This tag: torch 2.6.0, CUDA 12.4, Python 3.11.
ARG BASE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-devel
FROM ${BASE}

ARG GPU_EXTRAS=1
# flash-attn 2.7.4.post1 ships prebuilt wheels for torch 2.6 / CUDA 12 / Python 3.11 (xformers'
# builds for torch 2.6, 0.0.29.post2/3, bundle their own FlashAttention and ignore it). A newer BASE
# needs a FLASH_ATTN_VERSION with wheels for its torch (or a slow source build), and one inside the
# range its xformers names (0.0.32 refuses to import beside a flash-attn outside 2.7.1-2.8.2).
ARG FLASH_ATTN_VERSION=2.7.4.post1
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
RUN if [ "$GPU_EXTRAS" = "1" ]; then \
      pip install packaging ninja \
   && pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}" \
   && pip install "xformers>=0.0.29.post2" "liger-kernel>=0.5.0" \
   && pip show flash-attn xformers liger-kernel | grep -E "^(Name|Version)"; \
    fi

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
