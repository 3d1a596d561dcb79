# Every target sets itself up: a fresh clone needs nothing but python3 (3.10+) and make.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# DeepSpeed's JIT-built ops (CPU Adam for optimizer offload) are kept with the virtual environment.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.venv/torch-extensions

.PHONY: install test lint demo bench-smoke gpu-check gpu-wheels clean

$(STAMP): requirements/lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install -q -r requirements/lock.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check megalite kernels tests scripts

test: $(STAMP) lint
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	bash scripts/demo.sh

bench-smoke: $(STAMP)
	$(PY) kernels/bench.py --smoke --out out/bench-smoke

# Wheels the offline GPU machine lacks (it has python3.12, torch and triton). Run here, carry .whl.
gpu-wheels:
	bash kernels/gpu_wheels.sh

# One command for a GPU machine: correctness first, then benchmarks; results in out/gpu-check.
gpu-check:
	bash kernels/gpu_check.sh

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
