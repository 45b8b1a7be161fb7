"""Benchmarks by name, and the interface each one implements.

Modules are imported only when a benchmark is requested, so listing names stays cheap and
importing this file has no side effects.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import datasets

from opsd_mm.types import Example


class Benchmark(Protocol):
    """One scripted benchmark.

    ``load`` returns the rows (hub schema); ``prompt`` turns a row into an Example whose
    ``question`` is the full official user message and ``images`` its images (raises
    ``ItemError`` for an unusable row); ``score`` grades one response into a dict with at least
    ``correct``, ``extracted`` and ``rule``; ``aggregate`` turns the runner's records into the
    benchmark's metrics. ``label`` says whether the scoring is the official one, and if not, how
    it deviates; ``headline`` names the metrics shown in the summary table.
    """

    name: str
    hub_id: str
    split: str
    label: str
    headline: tuple[str, ...]
    id_columns: tuple[str, ...]

    def load(self, data_dir: str | Path | None = None) -> datasets.Dataset: ...

    def item_id(self, item: dict[str, Any]) -> str: ...

    def categories(self, item: dict[str, Any]) -> dict[str, Any]: ...

    def prompt(self, item: dict[str, Any]) -> Example: ...

    def score(self, item: dict[str, Any], response: str) -> dict[str, Any]: ...

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]: ...

    def default_sampling(self, samples: int) -> dict[str, Any]: ...


# name -> (module under opsd_mm.eval.benchmarks, factory attribute, keyword arguments)
_REGISTRY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mmmu": ("mmmu", "MMMU", {}),
    "mathvista": ("mathvista", "MathVista", {}),
    "mathvision": ("mathvision", "MathVision", {}),
    "mathvision_mini": ("mathvision", "MathVision", {"split": "testmini"}),
    "wemath": ("wemath", "WeMath", {}),
    "zerobench": ("zerobench", "ZeroBench", {}),
    "zerobench_sub": ("zerobench", "ZeroBench", {"split": "zerobench_subquestions"}),
    "aime24": ("aime24", "AIME24", {}),
    "aime25": ("aime25", "AIME25", {}),
    "hmmt25": ("hmmt25", "HMMT25", {}),
    "amo_bench": ("amo_bench", "AMOBench", {}),
    "math500": ("math500", "MATH500", {}),
}

TEXT_MATH = ("aime24", "aime25", "hmmt25", "math500")
# ``--benchmarks all``: every benchmark once (variants such as zerobench_sub excluded).
DEFAULT_SUITE = (
    "mmmu",
    "mathvista",
    "mathvision",
    "wemath",
    "zerobench",
    "aime24",
    "aime25",
    "hmmt25",
    "amo_bench",
    "math500",
)


def list_benchmarks() -> list[str]:
    """Registered benchmark names."""
    return list(_REGISTRY)


def get_benchmark(name: str, **options: Any) -> Benchmark:
    """The benchmark registered as ``name``; ``options`` go to its constructor (e.g.
    ``prompt_style="matharena"`` for the text-math benchmarks)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown benchmark '{name}'; choose from {', '.join(_REGISTRY)}")
    module, attr, kwargs = _REGISTRY[name]
    cls = getattr(importlib.import_module(f"opsd_mm.eval.benchmarks.{module}"), attr)
    return cls(name=name, **{**kwargs, **options})
