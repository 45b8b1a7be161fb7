"""ZeroBench (100 questions; ``zerobench_sub``: 334 sub-questions), official exact-match check.

Prompt: ``{question_text}\\n\\n\\nLet's think step by step and give the final answer in curly
braces, like this: {final answer}``, with the 1-3 images of ``question_images_decoded``.

Check (the dataset card's snippet): lowercase and strip the response, take the last non-greedy
``{...}`` match (no newlines inside), and compare it with the stripped, lowercased gold exactly;
the parsed text itself is not stripped, so ``{ Paris }`` is wrong and ``{paris}`` right.

Metrics: run greedily with one sample for pass@1; with 5 samples at temperature 0.7, top_p 0.95
(the defaults here when samples > 1) the summary gives pass@5 and 5/5 reliability.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from opsd_mm.eval import metrics
from opsd_mm.eval.benchmarks._common import ItemError, load_rows
from opsd_mm.types import Example

SUFFIX = "\n\n\nLet's think step by step and give the final answer in curly braces, like this: {final answer}"


# A ``{`` followed by a ``}`` with no brace or newline between, searched in the reversed text:
# the first hit there is the last such pair.
_LAST_PAIR_REVERSED = re.compile(r"\}[^{}\n]*\{")


def parse_curly(response: str) -> str | None:
    """Last ``{...}`` of the stripped, lowercased response, or None: the last match of the
    official ``re.findall(r"\\{(.*?)\\}", ...)``, found in linear time.

    The official pattern's matches go left to right, each from a ``{`` to the first ``}`` after
    it on the same line. The last match lies on the last line holding a ``{`` before a ``}``;
    there it ends at the first ``}`` after the line's last ``{`` that has one, and starts at the
    first ``{`` after the ``}`` before that (or the line's start). The regex itself rescans the
    line from every unclosed ``{``; it is kept in bench/grading_legacy.py, and the tests fuzz
    the two against each other.
    """
    s = response.strip().lower()
    found = _LAST_PAIR_REVERSED.search(s[::-1])
    if found is None:
        return None
    last_open, close = len(s) - found.end(), len(s) - 1 - found.start()
    line_start = s.rfind("\n", 0, last_open) + 1
    start = s.find("{", max(s.rfind("}", line_start, last_open) + 1, line_start))
    return s[start + 1 : close]


def is_correct(parsed: str | None, gold: str) -> bool:
    return parsed is not None and parsed == gold.strip().lower()


class ZeroBench:
    hub_id = "jonathan-roberts1/zerobench"
    id_columns = ("question_id",)
    label = "official (ZeroBench exact match)"

    def __init__(self, name: str = "zerobench", split: str = "zerobench") -> None:
        self.name, self.split = name, split
        self.headline: tuple[str, ...] = ("pass@1", "pass@5", "5/5")

    def load(self, data_dir: str | Path | None = None) -> datasets.Dataset:
        return load_rows(self.name, self.hub_id, self.split, data_dir)

    def item_id(self, item: dict[str, Any]) -> str:
        return str(item["question_id"])

    def categories(self, item: dict[str, Any]) -> dict[str, Any]:
        return {}

    def prompt(self, item: dict[str, Any]) -> Example:
        iid = self.item_id(item)
        images = item.get("question_images_decoded") or []
        if not images or any(im is None for im in images):
            raise ItemError(f"item {iid}: 'question_images_decoded' has a missing image")
        return Example(
            id=iid,
            question=item["question_text"] + SUFFIX,
            answer=str(item["question_answer"]),
            images=tuple(images),
            meta={"benchmark": self.name},
        )

    def score(self, item: dict[str, Any], response: str) -> dict[str, Any]:
        parsed = parse_curly(response)
        return {
            "correct": is_correct(parsed, str(item["question_answer"])),
            "extracted": parsed,
            "rule": "curly" if parsed is not None else "none",
        }

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        c = metrics.correct_matrix(records)
        k = metrics.num_samples(records)
        out: dict[str, Any] = {**metrics.base_counts(records)}
        if k == 1:
            out["pass@1"] = out["accuracy"] = metrics.avg_at_k(c)
        else:
            out["accuracy"] = out[f"avg@{k}"] = metrics.avg_at_k(c)
            out[f"pass@{k}"] = metrics.pass_at_k(c, k)
            out[f"{k}/{k}"] = metrics.all_k(c)
        return out

    def default_sampling(self, samples: int) -> dict[str, Any]:
        if samples == 1:
            return {"temperature": 0.0}
        return {"temperature": 0.7, "top_p": 0.95}
