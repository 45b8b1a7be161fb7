"""Shared test fixtures. Tiny models are built once per session into a temporary cache."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

# Without a GPU, Triton kernels (ours in opsd_mm/loss/triton_divergence.py, tests/loss/
# test_kernel.py) run in Triton's interpreter, which must be chosen before Triton is first
# imported (it decorates its own library then): set here, before any test module loads. Not in
# the vLLM environment (tests/vllm), whose engine must see the machine as it is.
if (
    not torch.cuda.is_available()
    and "triton" not in sys.modules
    and importlib.util.find_spec("vllm") is None
):
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="session")
def tiny_text_dir(tiny_cache):
    from opsd_mm.model.tiny import resolve_tiny

    return resolve_tiny("text", tiny_cache)
