"""Prompt snapshots: the exact official user message of every fixture item, per benchmark.

The files under ``snapshots/`` are checked in; a change in prompt construction fails here.
Run with ``OPSD_UPDATE_SNAPSHOTS=1`` to rewrite them after an intended change.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from opsd_mm.eval.registry import TEXT_MATH, get_benchmark, list_benchmarks
from tests.fixtures.benchmarks import fixture_rows

SNAPSHOTS = Path(__file__).parent / "snapshots"
CASES = [(n, {}) for n in list_benchmarks()] + [
    (n, {"prompt_style": "matharena"}) for n in TEXT_MATH
]


def render(name: str, options: dict) -> str:
    bench = get_benchmark(name, **options)
    parts = []
    for row in fixture_rows(name):
        iid = bench.item_id(row)
        try:
            ex = bench.prompt(row)
        except ValueError as e:  # missing-image rows are part of the fixture
            parts.append(f"=== {iid} (error) ===\n{e}\n")
            continue
        parts.append(f"=== {iid} (images: {len(ex.images)}) ===\n{ex.question}\n")
    return "".join(parts)


@pytest.mark.parametrize("name, options", CASES, ids=[n + "".join(o.values()) for n, o in CASES])
def test_prompt_snapshot(name, options):
    suffix = "".join(f".{v}" for v in options.values())
    path = SNAPSHOTS / f"{name}{suffix}.txt"
    text = render(name, options)
    if os.environ.get("OPSD_UPDATE_SNAPSHOTS") == "1":
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"missing snapshot {path}; run with OPSD_UPDATE_SNAPSHOTS=1"
    assert text == path.read_text(encoding="utf-8")
