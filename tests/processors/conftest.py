"""Fixtures shared by the Qwen-VL processor tests: each tiny VL family, its processor and model
(module-scoped: built once per test module and family)."""

from __future__ import annotations

import pytest
import torch

from opsd_mm.config import ProcessorConfig
from opsd_mm.processors import build_processor
from opsd_mm.processors.vl import QwenVLProcessor

FAMILIES = {"qwen2-vl": "qwen2_vl", "qwen2.5-vl": "qwen2_5_vl", "qwen3-vl": "qwen3_vl"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_cache):
    """(tiny name, kind, model dir): each tiny VL model is built once per session."""
    from opsd_mm.model.tiny import resolve_tiny

    return request.param, FAMILIES[request.param], resolve_tiny(request.param, tiny_cache)


@pytest.fixture(scope="module")
def proc(family) -> QwenVLProcessor:
    _, kind, path = family
    return build_processor(ProcessorConfig(), str(path), kind)


@pytest.fixture(scope="module")
def model(family):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    m = AutoModelForImageTextToText.from_pretrained(family[2], dtype=torch.float32).eval()
    return m
