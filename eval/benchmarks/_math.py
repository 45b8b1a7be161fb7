"""Shared logic of the final-answer text-math benchmarks (AIME 2024/2025, HMMT Feb 2025,
MATH-500).

Prompt styles: ``opsd`` (default, OPSD's own evaluation) ``{problem}\\n\\nPlease reason step by
step, and put your final answer within \\boxed{}.``; ``matharena`` ``{instruction}\\n\\n{problem}``
with MathArena's competition instruction. Scoring: the last ``\\boxed{}`` (MathArena style also
accepts ``\\fbox{}``) with balanced braces, then math-verify against the gold answer (gold
first) in the grading worker; a timeout scores 0 and is counted. An expression beyond symbolic
evaluation (an exponent tower, a huge integer) is compared as a normalised string instead and
counted (``graded_by_guard``, grading.guard_verdict). No box scores 0
(``rule: no_boxed``). Metrics: avg@k (``accuracy``), pass@k and maj@k over k samples, and
accuracy per the benchmark's categories. MathArena checks equivalence with its own sympy-based
parser; math-verify stands in for it, which the label says.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from opsd_mm.eval import grading, metrics
from opsd_mm.eval.benchmarks._common import load_rows
from opsd_mm.types import Example

OPSD_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
MATHARENA_BOXED = "Put your final answer within \\boxed{}."
MATHARENA_AIME = MATHARENA_BOXED + "\nThe answer is an integer between 0 and 999 inclusive."
PROMPT_STYLES = ("opsd", "matharena")


class MathBenchmark:
    """A text-math benchmark; subclasses set the dataset and column names."""

    hub_id: str = ""
    split: str = "train"
    id_field: str = "id"
    problem_field: str = "problem"
    answer_field: str = "answer"
    category_fields: tuple[str, ...] = ()
    matharena_instruction: str = MATHARENA_BOXED

    def __init__(self, name: str, prompt_style: str = "opsd", timeout: float = 10.0) -> None:
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got '{prompt_style}'")
        self.name, self.prompt_style, self.timeout = name, prompt_style, timeout
        self.id_columns = (self.id_field,)
        k = "avg@k, pass@k, maj@k"
        self.headline = ("accuracy",)
        self.label = (
            f"official OPSD protocol (last \\boxed{{}}, math-verify; {k})"
            if prompt_style == "opsd"
            else "MathArena prompt; last \\boxed{}/\\fbox{} scored with math-verify in place of "
            f"MathArena's sympy checker ({k})"
        )

    def load(self, data_dir: str | Path | None = None) -> datasets.Dataset:
        return load_rows(self.name, self.hub_id, self.split, data_dir)

    def item_id(self, item: dict[str, Any]) -> str:
        return str(item[self.id_field])

    def categories(self, item: dict[str, Any]) -> dict[str, Any]:
        return {f: item.get(f) for f in self.category_fields}

    def prompt(self, item: dict[str, Any]) -> Example:
        problem = item[self.problem_field]
        if self.prompt_style == "opsd":
            text = problem + OPSD_SUFFIX
        else:
            text = f"{self.matharena_instruction}\n\n{problem}"
        return Example(
            id=self.item_id(item),
            question=text,
            answer=str(item[self.answer_field]),
            meta={"benchmark": self.name, **self.categories(item)},
        )

    def score(self, item: dict[str, Any], response: str) -> dict[str, Any]:
        commands = ("boxed",) if self.prompt_style == "opsd" else ("boxed", "fbox")
        boxed = grading.last_boxed(response, commands)
        if boxed is None:
            return {"correct": False, "extracted": None, "rule": "no_boxed", "timed_out": False}
        verdict = grading.math_equal(str(item[self.answer_field]), boxed, self.timeout)
        out = {
            "correct": verdict.correct,
            "extracted": boxed,
            "rule": "timeout" if verdict.timed_out else "boxed",
            "timed_out": verdict.timed_out,
        }
        if verdict.graded_by_guard:
            out["graded_by_guard"] = True
        return out

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            **metrics.base_counts(records),
            **metrics.sample_metrics(records, majority=True),
        }
        for f in self.category_fields:
            out[f"by_{f}"] = metrics.grouped_accuracy(records, f)
        return out

    def default_sampling(self, samples: int) -> dict[str, Any]:
        # OPSD reports Avg@k at temperature 1.0; a single sample is decoded greedily.
        return {"temperature": 0.0} if samples == 1 else {"temperature": 1.0}
