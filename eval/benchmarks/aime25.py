"""AIME 2025 (``MathArena/aime_2025``, train, 30 problems, integer answers 0-999); accuracy is
also reported per ``problem_type``. See ``_math`` for the rules."""

from __future__ import annotations

from typing import Any

from opsd_mm.eval.benchmarks._math import MATHARENA_AIME, MathBenchmark


class AIME25(MathBenchmark):
    hub_id = "MathArena/aime_2025"
    split = "train"
    id_field = "problem_idx"
    category_fields = ("problem_type",)
    matharena_instruction = MATHARENA_AIME

    def __init__(self, name: str = "aime25", **options: Any) -> None:
        super().__init__(name, **options)
