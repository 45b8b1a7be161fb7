"""MathVista testmini (1,000 items), canonical ``query`` prompt; LLM or rule-based extraction.

MathVista's official pipeline asks an LLM (GPT-4) to extract the answer, after a few rules: an
empty response, a response that is literally one of the choices, a response that parses as the
integer/float answer type, and ``The answer is "..."``. Those rules are applied here as in the
official code (``rule: official:*``); where the official code would call the LLM we use rules
instead (``rule: rule:*``: last ``\\boxed{}``, an "answer is/Answer:" phrase, an option letter,
the last number). The official normalisation and exact match follow (choice letter -> choice
text, else nearest choice by edit distance; integer; float rounded to ``precision``; list).

Because of that substitution the result is NOT the official score and is labelled so. With a
``judge`` (``opsd-mm eval --judge-url URL --judge-model NAME``, eval/judge.py) the official
pipeline runs: the pre-rules of the official default run (``extract_answer.py`` without
``--quick_extract``), then the official extraction prompt (:data:`DEMO_PROMPT`, byte for byte,
with the official ``create_test_prompt`` and the official model settings: temperature 0, 1,024
tokens), the reply stripped, then the official normalisation and exact match; the label becomes
``official extraction by NAME``. An ``extractor(query, response) -> str`` callable is the
older hook for an extraction made elsewhere.

The nearest-option fallback uses rapidfuzz's Levenshtein distance, the maintained sibling of the
``Levenshtein`` package the official code calls (the same unit-cost edit distance, in C and
bit-parallel, so a 2 MB response against each option costs milliseconds).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
from rapidfuzz.distance import Levenshtein

from opsd_mm.eval import grading, metrics
from opsd_mm.eval.benchmarks._common import load_rows, require_image
from opsd_mm.eval.judge import Judge, JudgeRequest
from opsd_mm.types import Example

Extractor = Callable[[str, str], str]
# The official model settings (models/gpt.py: GPT_Model defaults).
JUDGE_TEMPERATURE, JUDGE_MAX_TOKENS = 0.0, 1024

# MathVista's answer-extraction prompt, byte for byte: lupantech/MathVista,
# evaluation/prompts/ext_ans.py (``demo_prompt``) at commit
# 53d525874bdde205128e6b160b7357a88277d479 (file last changed in ed0d56de2146). The "\n"s inside
# are escapes in the official source too; tests/eval/test_eval_judge.py checks its SHA-256.
DEMO_PROMPT = """
Please read the following example. Then extract the answer from the model response and type it at the end of the prompt.

Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.
Question: Which number is missing?

Model response: The number missing in the sequence is 14.

Extracted answer: 14

Hint: Please answer the question requiring a floating-point number with one decimal place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.
Question: What is the fraction of females facing the camera?

Model response: The fraction of females facing the camera is 0.6, which means that six out of ten females in the group are facing the camera.

Extracted answer: 0.6

Hint: Please answer the question requiring a floating-point number with two decimal places and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.
Question: How much money does Luca need to buy a sour apple candy and a butterscotch candy? (Unit: $)

Model response: Luca needs $1.45 to buy a sour apple candy and a butterscotch candy.

Extracted answer: 1.45

Hint: Please answer the question requiring a Python list as an answer and provide the final list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.
Question: Between which two years does the line  graph saw its maximum peak?

Model response: The line graph saw its maximum peak between 2007 and 2008.

Extracted answer: [2007, 2008]

Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.
Question: What fraction of the shape is blue?\nChoices:\n(A) 3/11\n(B) 8/11\n(C) 6/11\n(D) 3/5

Model response: The correct answer is (B) 8/11.

Extracted answer: B
"""


def extraction_prompt(query: str, response: str) -> str:
    """The official ``create_test_prompt(demo_prompt, query, response)``."""
    return f"{DEMO_PROMPT.strip()}\n\n{query}\n\n{response}\n\nExtracted answer: "


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


def _quick(response: str) -> str | None:
    """The official quick rule ``re.search(r'The answer is "(.*)"\\.', response)``, linear:
    the first occurrence of the phrase on a line that has a ``".`` after it, up to that line's
    last ``".`` (the greedy group); the regex rescans the line from every occurrence."""
    opener, start = 'The answer is "', 0
    while (at := response.find(opener, start)) >= 0:
        line_end = response.find("\n", at)
        line_end = len(response) if line_end < 0 else line_end
        close = response.rfind('".', at + len(opener), line_end)
        if close >= 0:
            return response[at + len(opener) : close]
        start = line_end  # a later occurrence on this line has no ". after it either
    return None


def official_pre_rules(
    response: str, item: dict[str, Any], quick: bool = True
) -> tuple[str, str] | None:
    """The rules the official extractor applies before calling its LLM; ``quick``: also
    ``The answer is "..."`` (the official ``--quick_extract``, off in its default run)."""
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
    if quick:
        found = _quick(response)
        if found is not None:
            return found, "official:quick"
    return None


def levenshtein(a: str, b: str) -> int:
    """Unit-cost edit distance (the official code maps a free-text choice to the nearest
    option with ``Levenshtein.distance``)."""
    return Levenshtein.distance(a, b)


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
        self,
        name: str = "mathvista",
        split: str = "testmini",
        extractor: Extractor | None = None,
        judge: Judge | None = None,
    ) -> None:
        if extractor is not None and judge is not None:
            raise ValueError("MathVista takes an extractor or a judge, not both")
        self.name, self.split, self.extractor, self.judge = name, split, extractor, judge
        if judge is not None:
            self.label = f"official extraction by {judge.model}"
        elif extractor is not None:
            self.label = "official pipeline with the supplied LLM extractor"
        else:
            self.label = (
                "NON-OFFICIAL: rule-based answer extraction in place of MathVista's GPT-4 "
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

    def _judge_request(self, item: dict[str, Any], response: str) -> JudgeRequest | None:
        """The extraction request for a response the official pre-rules do not settle."""
        if self.judge is None or official_pre_rules(response, item, quick=False) is not None:
            return None
        prompt = extraction_prompt(item["query"], response)
        return JudgeRequest(prompt, JUDGE_TEMPERATURE, JUDGE_MAX_TOKENS)

    def judge_requests(self, item: dict[str, Any], response: str) -> list[JudgeRequest]:
        """What the judge must answer before :meth:`score` can score ``response``."""
        request = self._judge_request(item, response)
        return [] if request is None else [request]

    def score(self, item: dict[str, Any], response: str) -> dict[str, Any]:
        if self.judge is not None:
            return self._score_judged(item, response)
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

    def _score_judged(self, item: dict[str, Any], response: str) -> dict[str, Any]:
        """The official pipeline: pre-rules, else the judge's extraction (stripped, as the
        official ``get_response`` returns it), then normalisation and exact match."""
        assert self.judge is not None
        request = self._judge_request(item, response)
        entries = []
        if request is None:
            found = official_pre_rules(response, item, quick=False)
            assert found is not None
            extraction, rule = found
        else:
            reply = self.judge.reply(request, f"{self.name} item {self.item_id(item)}")
            extraction, rule = reply.text.strip(), "judge"
            entries.append(self.judge.entry(request, reply))
        prediction = normalize(extraction, item)
        out = {
            "correct": prediction == str(item["answer"]),
            "extracted": prediction,
            "rule": rule,
            "official_rule": True,
        }
        if entries:
            out["judge"] = entries
        return out

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            **metrics.base_counts(records),
            **metrics.sample_metrics(records),
            "label": self.label,
            "n_samples_by_official_rules": metrics.count_flag(records, "official_rule"),
        }
        if self.judge is not None:
            out.update(metrics.judge_counts(records))
        for key in ("question_type", "answer_type", *META_KEYS):
            out[f"by_{key}"] = metrics.grouped_accuracy(records, key)
        return out

    def default_sampling(self, samples: int) -> dict[str, Any]:
        return {"temperature": 0.0} if samples == 1 else {"temperature": 1.0}
