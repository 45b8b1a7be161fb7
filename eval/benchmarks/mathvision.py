"""MathVision (test 3,040; ``mathvision_mini``: testmini 304), official CoT prompt and scorer.

Prompt: ``Please solve the problem step by step and put your answer in one "\\boxed{}". If it is
a multiple choice question, only one letter is allowed in the "\\boxed{}".\\n{question}\\n
{options}`` where options print as ``(A) x\\n...(E) y\\n`` unless they are literally A..E (the
choices are drawn in the image), in which case nothing is printed. One composite image per item.

Scoring restates MATH-V's evaluate.py (``_mathvision_rules.py``): official extraction, then
equal to the gold letter/value, numerically equal to 2 decimals, or equal to the option text
behind the gold letter. Numeric equivalence uses latex2sympy2_extended (the official code uses
latex2sympy2) under the grading worker's timeout. Reported overall, per level and per subject.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from opsd_mm.eval import metrics
from opsd_mm.eval.benchmarks._common import load_rows, require_image
from opsd_mm.eval.benchmarks._mathvision_rules import mathvision_equal, mathvision_extract
from opsd_mm.types import Example

INSTRUCTION = (
    'Please solve the problem step by step and put your answer in one "\\boxed{}". '
    'If it is a multiple choice question, only one letter is allowed in the "\\boxed{}".\n'
)


def format_options(options: Sequence[str]) -> str:
    """``(A) x\\n(B) y\\n...``; empty when there are none or they are just the letters A-E."""
    if not options or "".join(options) == "ABCDE":
        return ""
    return "".join(f"({chr(65 + i)}) {o}\n" for i, o in enumerate(options))


class MathVision:
    hub_id = "MathLLMs/MathVision"
    headline = ("accuracy",)
    id_columns = ("id",)
    label = "official (MATH-V evaluate.py; latex2sympy2_extended for numeric equality)"

    def __init__(
        self, name: str = "mathvision", split: str = "test", timeout: float = 10.0
    ) -> None:
        self.name, self.split, self.timeout = name, split, timeout

    def load(self, data_dir: str | Path | None = None) -> datasets.Dataset:
        return load_rows(self.name, self.hub_id, self.split, data_dir)

    def item_id(self, item: dict[str, Any]) -> str:
        return str(item["id"])

    def categories(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"level": item.get("level"), "subject": item.get("subject")}

    def prompt(self, item: dict[str, Any]) -> Example:
        iid = self.item_id(item)
        image = require_image(iid, "decoded_image", item.get("decoded_image"))
        text = INSTRUCTION + f"{item['question']}\n{format_options(item['options'] or [])}"
        return Example(
            id=iid,
            question=text,
            answer=str(item["answer"]),
            images=(image,),
            # The <imageN> tags are text: all of them refer to the one composite image.
            meta={"benchmark": self.name, "image_placeholders": False, **self.categories(item)},
        )

    def score(self, item: dict[str, Any], response: str) -> dict[str, Any]:
        gold = str(item["answer"])
        options = list(item["options"] or [])
        gold_option = ""
        if options and len(gold) == 1 and 0 <= ord(gold) - 65 < len(options):
            gold_option = options[ord(gold) - 65]
        extracted, rule = mathvision_extract(response)
        verdict = mathvision_equal(gold, gold_option, extracted, self.timeout)
        out = {
            "correct": verdict.correct,
            "extracted": extracted,
            "rule": rule,
            "timed_out": verdict.timed_out,
        }
        if verdict.graded_by_guard:
            out["graded_by_guard"] = True
        return out

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {
            **metrics.base_counts(records),
            **metrics.sample_metrics(records),
            "by_level": metrics.grouped_accuracy(records, "level"),
            "by_subject": metrics.grouped_accuracy(records, "subject"),
        }

    def default_sampling(self, samples: int) -> dict[str, Any]:
        return {"temperature": 0.0} if samples == 1 else {"temperature": 1.0}
