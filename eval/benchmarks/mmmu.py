"""MMMU validation (900 items: 847 multiple choice, 53 open), scored by MMMU's official rules.

Prompt (MMMU's eval config): multiple choice ``{question}\\n(A) opt\\n(B) opt\\n\\nAnswer with the
option's letter from the given choices directly.``; open ``{question}\\nAnswer the question using
a single word or phrase.`` The ``<image k>`` placeholders stay in the text (the VL processors put
image k there); ``Example.images`` holds image_1 .. image_K, K the largest k referenced in the
question or options.

Scoring restates MMMU's eval_utils (the parsers below). Unlike lmms-eval's current open
path, every parsed candidate is tried, so "The answer is 12.97" is right against "12.97". The
only deviation is the random fallback, seeded per item (``42:<id>``) rather than from one global
stream, so that resumed and re-scored runs agree; it is labelled ``rule: random``.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from opsd_mm.eval import metrics
from opsd_mm.eval.benchmarks._common import load_rows, require_image
from opsd_mm.types import Example

DOMAINS = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": [
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    ],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": [
        "Agriculture",
        "Architecture_and_Engineering",
        "Computer_Science",
        "Electronics",
        "Energy_and_Power",
        "Materials",
        "Mechanical_Engineering",
    ],
}
SUBJECTS = [s for subs in DOMAINS.values() for s in subs]
SUBJECT_TO_DOMAIN = {s: d for d, subs in DOMAINS.items() for s in subs}
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
OPEN_SUFFIX = "Answer the question using a single word or phrase."


def parse_options(options: str | list[str]) -> list[str]:
    """The ``options`` column is a string holding a Python list literal (``'[]'`` for open)."""
    if isinstance(options, list):
        return [str(o) for o in options]
    value = ast.literal_eval(options) if options.strip() else []
    return [str(o) for o in value]


def subject_of(item_id: str) -> str:
    """``validation_Art_Theory_3`` -> ``Art_Theory`` (the official grouping)."""
    return "_".join(item_id.split("_")[1:-1])


# ----------------------------------------------------------------------------- parsers
# Restated from MMMU's eval/eval_utils.py (official). Deviation: the random fallback draws from
# ``random.Random(f"{seed}:{item_id}")`` instead of one global stream seeded once with 42, so a
# resumed or re-scored run picks the same letter for the same item whatever the order.


def mmmu_parse_choice(
    response: str,
    all_choices: Sequence[str],
    index2ans: dict[str, str],
    *,
    item_id: str = "",
    seed: int = 42,
) -> tuple[str, str]:
    """Official multiple-choice parser; returns ``(letter, rule)``.

    Rules: ``bracket`` ``(X)``; ``space`` `` X ``; ``option_text`` (only for responses of more
    than 5 words); ``random`` (seeded fallback). With several candidates, the one whose last
    occurrence is rightmost (by the rule that fired) wins.
    """
    for ch in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(ch)
    response = " " + response + " "
    candidates = [c for c in all_choices if f"({c})" in response]
    rule = "bracket"
    if not candidates:
        candidates = [c for c in all_choices if f" {c} " in response]
        rule = "space"
    if not candidates and len(response.split()) > 5:
        candidates = [i for i, a in index2ans.items() if a.lower() in response.lower()]
        rule = "option_text"
    if not candidates:
        return random.Random(f"{seed}:{item_id}").choice(list(all_choices)), "random"
    if len(candidates) == 1:
        return candidates[0], rule
    if rule == "bracket":
        pos = [response.rfind(f"({c})") for c in candidates]
    elif rule == "space":
        pos = [response.rfind(f" {c} ") for c in candidates]
    else:
        pos = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[pos.index(max(pos))], rule


# The official patterns, each digit-leading alternative behind ``(?<!\d)``: a match can never
# start inside a digit run (the run's first digit would have matched the same tail), so the
# lookbehind only skips attempts that fail, and a 100k-digit run is scanned once instead of once
# per digit. bench/grading_legacy.py keeps the official patterns; the tests fuzz one against
# the other.
_DIGIT = re.compile(r"\d")
_MMMU_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")  # linear as it is: \b starts a run
_MMMU_SCIENTIFIC = re.compile(r"-?(?<!\d)\d+(?:\.\d+)?[eE][+-]?\d+")
_MMMU_SIMPLE = re.compile(r"-?(?:(?<!\d)\d+\.\d+|\.\d+|(?<!\d)\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def mmmu_extract_numbers(s: str) -> list[str]:
    """Comma-grouped, scientific and plain numbers, in that order (official patterns)."""
    if _DIGIT.search(s) is None:  # no digit, no number: three passes saved
        return []
    return _MMMU_COMMAS.findall(s) + _MMMU_SCIENTIFIC.findall(s) + _MMMU_SIMPLE.findall(s)


def _mmmu_is_number(s: str) -> bool:
    try:
        float(s.replace(",", ""))
    except ValueError:
        return False
    return True


def mmmu_normalize(s: str) -> list[str | float]:
    """A number becomes a float rounded to 2 decimals; else lowercase, and a single character
    becomes ``" c"`` and ``"c "`` so it cannot match inside a word."""
    s = s.strip()
    if _mmmu_is_number(s):
        return [round(float(s.replace(",", "")), 2)]
    s = s.lower()
    return [" " + s, s + " "] if len(s) == 1 else [s]


_MMMU_INDICATORS = (
    "could be ",
    "so ",
    "is ",
    "thus ",
    "therefore ",
    "final ",
    "answer ",
    "result ",
)


def mmmu_parse_open(response: str) -> list[str | float]:
    """Official open-answer parser: the shortest tail after an indicator in each line (``=``
    also counts in the last line), plus every number in those tails, normalised.

    As officially, an empty tail counts as no tail yet: the next indicator's tail replaces it
    even when longer ("the answer is \\nParis" keeps "is", the tail after "answer ").
    """
    response = response.strip().strip(".").lower()
    # The official split also tries r"\.\s(?=[A-Z])", which never fires after lowercasing.
    pieces = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys: list[str] = []
    for i, piece in enumerate(pieces):
        indicators = _MMMU_INDICATORS + (("=",) if i == len(pieces) - 1 else ())
        shortest: str | None = None
        for ind in indicators:
            if ind in piece:
                tail = piece.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    if not keys:
        keys = [response]
    preds: list[str] = list(keys)
    for k in keys:
        preds.extend(mmmu_extract_numbers(k))
    # First occurrences in order (the official code returns a set; a list keeps records stable).
    return list(dict.fromkeys(n for p in preds for n in mmmu_normalize(p)))


def mmmu_gold_list(answer: str) -> list[str]:
    """MMMU answers are strings; a few open answers hold a Python list literal of accepted
    values."""
    answer = answer.strip()
    if answer.startswith("[") and answer.endswith("]"):
        try:
            value = ast.literal_eval(answer)
        except (ValueError, SyntaxError):
            return [answer]
        if isinstance(value, list):
            return [str(v) for v in value]
    return [answer]


def mmmu_open_correct(golds: Sequence[str], preds: Sequence[str | float]) -> bool:
    """Official open check: a normalised gold string inside a predicted string, or a predicted
    float equal to a gold float."""
    norm: list[str | float] = []
    for g in golds:
        norm.extend(mmmu_normalize(g))
    for p in preds:
        if isinstance(p, str):
            if any(isinstance(n, str) and n in p for n in norm):
                return True
        elif p in norm:
            return True
    return False


class MMMU:
    hub_id = "MMMU/MMMU"
    headline = ("accuracy",)
    id_columns = ("id",)
    label = "official (MMMU eval_utils; random fallback seeded per item)"

    def __init__(self, name: str = "mmmu", split: str = "validation", seed: int = 42) -> None:
        self.name, self.split, self.seed = name, split, seed

    def load(self, data_dir: str | Path | None = None) -> datasets.Dataset:
        return load_rows(self.name, self.hub_id, self.split, data_dir, configs=SUBJECTS)

    def item_id(self, item: dict[str, Any]) -> str:
        return str(item["id"])

    def categories(self, item: dict[str, Any]) -> dict[str, Any]:
        subject = subject_of(self.item_id(item))
        return {
            "subject": subject,
            "domain": SUBJECT_TO_DOMAIN.get(subject),
            "question_type": item["question_type"],
        }

    def prompt(self, item: dict[str, Any]) -> Example:
        iid = self.item_id(item)
        options = parse_options(item["options"])
        question = item["question"]
        if item["question_type"] == "multiple-choice":
            listed = "".join(f"({chr(65 + i)}) {o}\n" for i, o in enumerate(options))
            text = f"{question}\n{listed}\n{MC_SUFFIX}"
        else:
            text = f"{question}\n{OPEN_SUFFIX}"
        # images[k-1] is image_k, so a processor can place <image k> by its number.
        refs = re.findall(r"<image (\d+)>", " ".join([question, *options]))
        top = max((int(k) for k in refs), default=0)
        images = tuple(
            require_image(iid, f"image_{k}", item.get(f"image_{k}")) for k in range(1, top + 1)
        )
        return Example(
            id=iid,
            question=text,
            answer=str(item["answer"]),
            images=images,
            meta={"benchmark": self.name, **self.categories(item)},
        )

    def score(self, item: dict[str, Any], response: str) -> dict[str, Any]:
        golds = mmmu_gold_list(str(item["answer"]))
        if item["question_type"] == "multiple-choice":
            options = parse_options(item["options"])
            choices = [chr(65 + i) for i in range(len(options))]
            pred, rule = mmmu_parse_choice(
                response,
                choices,
                dict(zip(choices, options)),
                item_id=self.item_id(item),
                seed=self.seed,
            )
            return {"correct": pred in golds, "extracted": pred, "rule": rule}
        preds = mmmu_parse_open(response)
        return {
            "correct": mmmu_open_correct(golds, preds),
            "extracted": preds,
            "rule": "open",
        }

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {
            **metrics.base_counts(records),
            **metrics.sample_metrics(records),
            "by_domain": metrics.grouped_accuracy(records, "domain"),
            "by_subject": metrics.grouped_accuracy(records, "subject"),
            "by_question_type": metrics.grouped_accuracy(records, "question_type"),
        }

    def default_sampling(self, samples: int) -> dict[str, Any]:
        return {"temperature": 0.0} if samples == 1 else {"temperature": 1.0}
