"""Tiny offline models and demo data, built by our own code (no hub, no files checked in).

What the demo, ``model.name_or_path: tiny:<name>``, ``data.source: synthetic:vl_count`` and the
tests share at run time, and nothing else (test-only data lives under ``tests/fixtures``):

- ``resolve_tiny("text")`` returns a local directory holding a tiny model and its tokenizer (and
  image processor for VL), building it on first use under a cache directory (:mod:`.text`,
  :mod:`.vl`);
- :mod:`.vl_tasks` generates the synthetic vision-language counting task from a seed;
- :mod:`.server` starts an ``opsd-mm serve`` subprocess on loopback (the generation-server
  tests and ``bench/async_rollout.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

TINY_NAMES = ("text", "qwen2-vl", "qwen2.5-vl", "qwen3-vl")


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
    if name == "text":
        from opsd_mm.testing.text import build_tiny_text

        build_tiny_text(out)
    else:
        from opsd_mm.testing.vl import build_tiny_vl

        build_tiny_vl(out, family=name)
    (out / ".complete").write_text("ok\n")
    return out
