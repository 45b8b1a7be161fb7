"""MathVista testmini (1,000 items), canonical ``query`` prompt; rule-based extraction.

MathVista's official pipeline asks an LLM (GPT-4) to extract the answer, after a few rules: an
empty response, a response that is literally one of the choices, a response that parses as the
integer/float answer type, and ``The answer is "..."``. Those rules are applied here as in the
official code (``rule: official:*``); where the official code would call the LLM we use rules
instead (``rule: rule:*``: last ``\\boxed{}``, an "answer is/Answer:" phrase, an option letter,
the last number). The official normalisation and exact match follow (choice letter -> choice
text, else nearest choice by edit distance; integer; float rounded to ``precision``; list).

Because of that substitution the result is NOT the official score and is labelled so. Pass an
``extractor(query, response) -> str`` (an LLM judge) to restore the official pipeline.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets

from opsd_mm.eval import grading, metrics
from opsd_mm.eval.benchmarks._common import load_rows, require_image
from opsd_mm.types import Example

Extractor = Callable[[str, str], str]
META_KEYS = ("category", "task", "context", "grade", "language", "source", "skills")
_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+"


def _clean(text: str) -> str:
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    return text.replace("$", "").strip().rstrip(".").strip()


def rule_extract(response: str, item: dict[str, Any]) -> tuple[str, str]:
    """Rule-based stand-in for the LLM extractor; returns ``(extraction, rule)``."""
    boxed = grading.last_boxed(response)
    if boxed is not None:
        return _clean(boxed), "rule:boxed"
    phrases = re.findall(r"(?:answer is|answer:)\s*(.+)", response, flags=re.IGNORECASE)
    if phrases:
        return _clean(phrases[-1]), "rule:answer_phrase"
    if item["question_type"] == "multi_choice":
        n = len(item["choices"] or [])
        letters = [m for m in re.findall(r"\(([A-Z])\)|\b([A-Z])\b", response)]
        flat = [a or b for a, b in letters if 0 <= ord(a or b) - 65 < n]
        if flat:
            return flat[-1], "rule:letter"
    elif item["answer_type"] in ("integer", "float"):
        nums = re.findall(_NUMBER, response)
        if nums:
            return nums[-1].replace(",", ""), "rule:last_number"
    return response.strip(), "rule:raw"


def official_pre_rules(response: str, item: dict[str, Any]) -> tuple[str, str] | None:
    """The rules the official extractor applies before calling its LLM."""
    if response == "":
        return "", "official:empty"
    if item["question_type"] == "multi_choice" and response in (item["choices"] or []):
        return response, "official:choice"
    if item["answer_type"] == "integer":
        try:
            return str(int(response)), "official:integer"
        except ValueError:
            pass
    if item["answer_type"] == "float":
        try:
            return str(float(response)), "official:float"
        except ValueError:
            pass
    quick = re.search(r'The answer is "(.*)"\.', response)
    if quick:
        return quick.group(1), "official:quick"
    return None


def levenshtein(a: str, b: str) -> int:
    """Plain edit distance (the official code maps a free-text choice to the nearest option)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def normalize(extraction: str, item: dict[str, Any]) -> str | None:
    """MathVista's ``normalize_extracted_answer``."""
    choices = item["choices"] or []
    if item["question_type"] == "multi_choice":
        extraction = extraction.strip()
        letters = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letters:
            extraction = letters[0].upper()
        options = [chr(65 + i) for i in range(len(choices))]
        if extraction in options:
            return choices[options.index(extraction)]
        dists = [levenshtein(extraction, c) for c in choices]
        return choices[dists.index(min(dists))]
    if item["answer_type"] == "integer":
        try:
            return str(int(float(extraction)))
        except (ValueError, OverflowError):  # "inf", "1e400": a wrong answer, not a crash
            return None
    if item["answer_type"] == "float":
        precision = item.get("precision")
        try:
            return str(round(float(extraction), int(precision if precision is not None else 2)))
        except (ValueError, OverflowError):
            return None
    return str(extraction)


class MathVista:
    hub_id = "AI4Math/MathVista"
    headline = ("accuracy",)
    id_columns = ("pid",)

    def __init__(
        self, name: str = "mathvista", split: str = "testmini", extractor: Extractor | None = None
    ) -> None:
        self.name, self.split, self.extractor = name, split, extractor
        self.label = (
            "official pipeline with the supplied LLM extractor"
            if extractor
            else "NON-OFFICIAL: rule-based answer extraction in place of MathVista's GPT-4 "
            "extractor (official pre-rules, normalisation and exact match)"
        )

    def load(self, data_dir: str | Path | None = None) -> datasets.Dataset:
        return load_rows(self.name, self.hub_id, self.split, data_dir)

    def item_id(self, item: dict[str, Any]) -> str:
        return str(item["pid"])

    def categories(self, item: dict[str, Any]) -> dict[str, Any]:
        meta = item.get("metadata") or {}
        out = {k: meta.get(k) for k in META_KEYS}
        out.update(question_type=item["question_type"], answer_type=item["answer_type"])
        return out

    def prompt(self, item: dict[str, Any]) -> Example:
        iid = self.item_id(item)
        image = require_image(iid, "decoded_image", item.get("decoded_image"))
        return Example(
            id=iid,
            question=item["query"],
            answer=str(item["answer"]),
            images=(image,),
            meta={"benchmark": self.name, **self.categories(item)},
        )

    def score(self, item: dict[str, Any], response: str) -> dict[str, Any]:
        found = official_pre_rules(response, item)
        if found is None and self.extractor is not None:
            found = (self.extractor(item["query"], response), "llm_extractor")
        extraction, rule = found if found is not None else rule_extract(response, item)
        prediction = normalize(extraction, item)
        return {
            "correct": prediction == str(item["answer"]),
            "extracted": prediction,
            "rule": rule,
            "official_rule": not rule.startswith("rule:"),
        }

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            **metrics.base_counts(records),
            **metrics.sample_metrics(records),
            "label": self.label,
            "n_samples_by_official_rules": metrics.count_flag(records, "official_rule"),
        }
        for key in ("question_type", "answer_type", *META_KEYS):
            out[f"by_{key}"] = metrics.grouped_accuracy(records, key)
        return out

    def default_sampling(self, samples: int) -> dict[str, Any]:
        return {"temperature": 0.0} if samples == 1 else {"temperature": 1.0}
