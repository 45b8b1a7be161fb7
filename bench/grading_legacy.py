"""The answer parsers as they were before issue 26, kept as the naive references that the linear
ones are checked against (tests/eval/test_eval_linear_graders.py) and timed beside
(bench/grading.py). Not part of the product: nothing under opsd_mm imports this file.

Each function is the former implementation, unchanged but for its name; the comment above it
says what made it slow on a hostile answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


# Quadratic on unclosed boxes: every ``\boxed{`` scans to the end of the text.
def last_boxed(text: str, commands: Sequence[str] = ("boxed",)) -> str | None:
    alternatives = "|".join(re.escape(c) for c in commands)
    pattern = re.compile(rf"\\(?:{alternatives})\s*\{{")
    starts = [m.end() for m in pattern.finditer(text)]
    for start in reversed(starts):
        depth = 1
        i = start
        while i < len(text):
            ch = text[i]
            if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
                i += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
            i += 1
    return None


# Quadratic on unclosed ``{``: each one scans to the end of its line.
def zerobench_parse_curly(response: str) -> str | None:
    found = re.findall(r"\{(.*?)\}", response.strip().lower())
    return found[-1] if found else None


# The scientific and plain patterns backtrack over every start inside a long digit run.
def mmmu_extract_numbers(s: str) -> list[str]:
    commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", s)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", s)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", s)
    return commas + scientific + simple


def _mmmu_is_number(s: str) -> bool:
    try:
        float(s.replace(",", ""))
    except ValueError:
        return False
    return True


def _mmmu_normalize(s: str) -> list[str | float]:
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


# Two differences from the official parser: an empty tail is kept as the shortest (the official
# code treats it as unset), and de-duplication is a list scan (quadratic in the numbers found).
def mmmu_parse_open(response: str) -> list[str | float]:
    response = response.strip().strip(".").lower()
    pieces = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys: list[str] = []
    for i, piece in enumerate(pieces):
        indicators = _MMMU_INDICATORS + (("=",) if i == len(pieces) - 1 else ())
        shortest: str | None = None
        for ind in indicators:
            if ind in piece:
                tail = piece.split(ind)[-1].strip()
                if shortest is None or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    if not keys:
        keys = [response]
    preds: list[str] = list(keys)
    for k in keys:
        preds.extend(mmmu_extract_numbers(k))
    out: list[str | float] = []
    for p in preds:
        for n in _mmmu_normalize(p):
            if n not in out:
                out.append(n)
    return out


# Pure-Python dynamic programme: len(a) * len(b) steps per option.
def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# Greedy ``(.*)`` backtracks to the line's end from every occurrence of the phrase.
def mathvista_quick(response: str) -> str | None:
    quick = re.search(r'The answer is "(.*)"\.', response)
    return quick.group(1) if quick else None


# Greedy ``(.*)`` to the last ``}`` from every ``oxed{`` when none closes.
def mathvision_boxed(s: str) -> str | None:
    found = re.findall(r"oxed{(.*)}", s, flags=re.S)
    return found[-1] if found else None


# Each pass removes one character of a run: quadratic on a long run of spaces or dots.
def amo_strip_before_brace(s: str) -> str:
    while " }" in s:
        s = s.replace(" }", "}")
    while ".}" in s:
        s = s.replace(".}", "}")
    return s
