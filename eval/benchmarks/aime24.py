"""AIME 2024 (``HuggingFaceH4/aime_2024``, train, 30 problems); see ``_math`` for the rules."""

from __future__ import annotations

from typing import Any

from opsd_mm.eval.benchmarks._math import MATHARENA_AIME, MathBenchmark


class AIME24(MathBenchmark):
    hub_id = "HuggingFaceH4/aime_2024"
    split = "train"
    id_field = "id"
    matharena_instruction = MATHARENA_AIME

    def __init__(self, name: str = "aime24", **options: Any) -> None:
        super().__init__(name, **options)
