"""Pluggable processors: chat templates, images and model families live here, never in the core.

``build_processor`` is the single entry point the CLI uses; each family module is imported only
when selected, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import Any

VL_MODEL_TYPES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}


def infer_kind(model_type: str) -> str:
    """Processor kind for a transformers ``model_type`` (text for anything not Qwen-VL)."""
    return VL_MODEL_TYPES.get(model_type, "text")


def build_processor(cfg: Any, model_path: str, model_type: str) -> Any:
    """Build the processor named by ``cfg.kind`` (``auto``: from the model type).

    ``cfg`` is an ``opsd_mm.config.ProcessorConfig``; ``model_path`` a local directory holding the
    tokenizer (and, for VL, the image processor).
    """
    kind = infer_kind(model_type) if cfg.kind == "auto" else cfg.kind
    if kind == "text":
        from opsd_mm.processors.text import TextProcessor

        return TextProcessor.from_pretrained(model_path, cfg)
    from opsd_mm.processors.vl import QwenVLProcessor

    return QwenVLProcessor.from_pretrained(
        model_path, cfg, family=kind, reuse_vision=cfg.reuse_vision
    )
