# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
DEMO_DATA ?= .cache/sample

.PHONY: setup demo finetune-demo finetune-demo-redllm test test-fast lint format clean sample-data

setup: $(STAMP)

# DS_BUILD_OPS=0: DeepSpeed's ops are JIT-built on first use instead of at install time.
# torchvision is removed after install: litdata pulls a CUDA build of it that does not match
# the CPU torch and breaks any import of it (operator torchvision::nms does not exist).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	DS_BUILD_OPS=0 $(PIP) install -q -c constraints.txt -e ".[dev]"
	-$(PIP) uninstall -y -q torchvision
	$(PY) -c "import torch, lightning_fabric, litdata, deepspeed, sentencepiece, tensorboard; print('environment ok: torch', torch.__version__)"
	touch $(STAMP)

# Sample corpus (SlimPajama layout) -> sentencepiece tokenizer -> litdata token chunks.
sample-data: $(STAMP)
	$(PY) -m orchestrator sample-data --out $(DEMO_DATA)

# The main job on the built-in sample corpus: CPU, 2 processes, a few minutes.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m orchestrator demo --data-dir $(DEMO_DATA) --run-dir $(DEMO_DIR)

# The demo model finetuned on questions about the corpus's facts (built in, no download), with
# exact-match accuracy on held-out questions before and after; first pretrains $(DEMO_DIR) to
# 900 steps (resumed from `make demo`'s 300: ~8 minutes on 2 CPUs), then finetunes (~1 minute).
finetune-demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m orchestrator demo --finetune --data-dir $(DEMO_DATA) --run-dir $(DEMO_DIR) --finetune-dir $(DEMO_DIR)-finetune

# The same with the demo model's encoder-decoder partner (RedLLM, redllm-tiny): pretrained as a
# prefix LM in runs/demo-redllm, then each question to its encoder and the answer from its decoder.
finetune-demo-redllm: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m orchestrator demo --finetune --arch encoder_decoder --data-dir $(DEMO_DATA) --run-dir runs/demo-redllm

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -ra --durations=30 tests

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -ra -m "not slow" tests

# ruff (pyproject.toml [tool.ruff]): lint, and check that the tree is formatted.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Apply the formatter and the safe lint fixes.
format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf runs .cache .pytest_cache
