"""MATH-500 (``HuggingFaceH4/MATH-500``, test, 500 problems); accuracy also per subject and
level. See ``_math`` for the rules."""

from __future__ import annotations

from typing import Any

from opsd_mm.eval.benchmarks._math import MATHARENA_BOXED, MathBenchmark


class MATH500(MathBenchmark):
    hub_id = "HuggingFaceH4/MATH-500"
    split = "test"
    id_field = "unique_id"
    category_fields = ("subject", "level")
    matharena_instruction = MATHARENA_BOXED

    def __init__(self, name: str = "math500", **options: Any) -> None:
        super().__init__(name, **options)
