"""Benchmark items as contamination references: question text and images of each item.

Loads through the benchmarks' own ``load`` (hub, or ``data_dir/<name>`` ``save_to_disk`` copies,
exactly as ``opsd-mm eval --data-dir`` does) and takes the raw question column, not the official
prompt: the prompt's fixed instruction text is shared by every item and would make them all look
alike to an n-gram comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from opsd_mm.data.contamination import ReferenceItem
from opsd_mm.eval.registry import get_benchmark

# Raw question columns, in order of preference (each benchmark has one of them).
TEXT_COLUMNS = ("question", "question_text", "problem", "Question", "prompt")


def _is_image(value: Any) -> bool:
    return isinstance(value, Image.Image) or (
        isinstance(value, dict) and value.get("bytes") is not None
    )


def item_images(row: dict[str, Any]) -> tuple[Any, ...]:
    """Every image value of a row (image columns and lists of images), in column order; path
    strings are not images here (MathVista's ``image`` column holds a path beside
    ``decoded_image``)."""
    out: list[Any] = []
    for value in row.values():
        if _is_image(value):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out.extend(v for v in value if _is_image(v))
    return tuple(out)


def item_text(bench: Any, row: dict[str, Any]) -> str:
    column = getattr(bench, "problem_field", None)
    if column and column in row:
        return str(row[column] or "")
    for column in TEXT_COLUMNS:
        if column in row:
            return str(row[column] or "")
    return ""


def load_references(names: Sequence[str], data_dir: str | Path | None) -> list[ReferenceItem]:
    """The items of each benchmark in ``names`` (registry names) as reference items."""
    items: list[ReferenceItem] = []
    for name in names:
        bench = get_benchmark(name)
        for row in bench.load(data_dir):
            items.append(
                ReferenceItem(name, bench.item_id(row), item_text(bench, row), item_images(row))
            )
    return items
