"""HMMT February 2025 (``MathArena/hmmt_feb_2025``, train, 30 problems); accuracy is also
reported per ``problem_type``. See ``_math`` for the rules."""

from __future__ import annotations

from typing import Any

from opsd_mm.eval.benchmarks._math import MATHARENA_BOXED, MathBenchmark


class HMMT25(MathBenchmark):
    hub_id = "MathArena/hmmt_feb_2025"
    split = "train"
    id_field = "problem_idx"
    category_fields = ("problem_type",)
    matharena_instruction = MATHARENA_BOXED

    def __init__(self, name: str = "hmmt25", **options: Any) -> None:
        super().__init__(name, **options)
