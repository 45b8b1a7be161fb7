"""Tiny offline models and tokenizers, built by our own code (no hub, no files checked in).

A product feature, not a test helper: ``model.name_or_path: tiny:<name>`` (the default model of
the tiny configs and the demo) resolves here. ``resolve_tiny("text")`` returns a local directory
holding a tiny model and its tokenizer (and image processor for VL), building it on first use
under a cache directory (:mod:`.text`, :mod:`.vl`; each has a 4-layer ``<name>-teacher`` on the
same tokenizer for ``teacher.kind=model``, :mod:`.teacher`). The synthetic tasks that train them live in
``opsd_mm.data.tasks`` and ``opsd_mm.data.vl_tasks``.
"""

from __future__ import annotations

import os
from pathlib import Path

STUDENT_NAMES = ("text", "qwen2-vl", "qwen2.5-vl", "qwen3-vl")
# Each student's 4-layer teacher on the same tokenizer (opsd_mm.model.tiny.teacher).
TEACHER_NAMES = tuple(f"{name}-teacher" for name in STUDENT_NAMES)
TINY_NAMES = STUDENT_NAMES + TEACHER_NAMES


def default_cache_dir() -> Path:
    return Path(os.environ.get("OPSD_MM_CACHE", Path.home() / ".cache" / "opsd-mm")) / "tiny"


def resolve_tiny(name: str, cache_dir: str | Path | None = None) -> Path:
    """Directory of the tiny model ``name`` (one of TINY_NAMES), built if missing."""
    if name not in TINY_NAMES:
        raise ValueError(f"unknown tiny model 'tiny:{name}'; choose one of {list(TINY_NAMES)}")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / name
    if (out / ".complete").exists():
        return out
    if name in TEACHER_NAMES:
        from opsd_mm.model.tiny.teacher import build_tiny_teacher

        build_tiny_teacher(out, student=name.removesuffix("-teacher"))
    elif name == "text":
        from opsd_mm.model.tiny.text import build_tiny_text

        build_tiny_text(out)
    else:
        from opsd_mm.model.tiny.vl import build_tiny_vl

        build_tiny_vl(out, family=name)
    (out / ".complete").write_text("ok\n")
    return out
