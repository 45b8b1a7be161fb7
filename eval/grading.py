"""Answer extraction and equivalence shared by the benchmarks.

Why a separate worker process: math-verify and latex2sympy can spin for minutes on adversarial
model output, and math-verify's own timeout uses ``signal.alarm``, which only works on the main
thread. Every symbolic comparison therefore runs in one long-lived child process
(:func:`call_with_timeout`, see ``worker.py``); a call past its deadline kills the child, scores
0 and is reported as ``timed_out`` so that aggregates can count it. The child is started on
first use (no import-time side effects).

Pure string rules (last ``\\boxed{}``, MathVision's cleanup, MMMU's parsers) run in-process.
"""

from __future__ import annotations

import ast
import atexit
import random
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from opsd_mm.eval.worker import Worker

DEFAULT_TIMEOUT_S = 10.0

# ----------------------------------------------------------------------------- boxed answers


def last_boxed(text: str, commands: Sequence[str] = ("boxed",)) -> str | None:
    """Content of the last ``\\boxed{...}`` (or another listed command) with balanced braces.

    Scans occurrences from the end and returns the first whose braces close, so a truncated
    final box falls back to the previous complete one. Escaped braces (``\\{``) do not count.
    """
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


# ----------------------------------------------------------------------------- timeout worker


@dataclass(frozen=True)
class Verdict:
    """Outcome of a guarded symbolic check: ``timed_out`` implies ``correct`` is False."""

    correct: bool
    timed_out: bool = False
    error: str | None = None


_WORKER: Worker | None = None
_WORKER_LOCK = threading.Lock()


def call_with_timeout(
    fn: Callable[..., Any], args: tuple = (), timeout: float = DEFAULT_TIMEOUT_S
) -> tuple[str, Any]:
    """Run the picklable module-level ``fn(*args)`` in the grading worker.

    Returns ``("ok", value)``, ``("error", message)`` or ``("timeout", None)``.
    """
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = Worker()
            atexit.register(_WORKER.close)
    return _WORKER.call(fn, args, timeout)


def _guarded(fn: Callable[..., Any], args: tuple, timeout: float) -> Verdict:
    status, value = call_with_timeout(fn, args, timeout)
    if status == "timeout":
        return Verdict(False, timed_out=True)
    if status == "error":
        return Verdict(False, error=value)
    return Verdict(bool(value))


# ----------------------------------------------------------------------------- math-verify


def _math_verify_job(gold: str, pred: str) -> bool:
    """Runs in the worker. Both sides are boxed so LaTeX without ``$`` still parses; gold first,
    as math-verify's ``verify`` is not symmetric."""
    from math_verify import parse, verify

    gold_p = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    pred_p = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if not gold_p or not pred_p:
        return False
    return bool(verify(gold_p, pred_p, timeout_seconds=None))


def math_equal(gold: str, pred: str, timeout: float = DEFAULT_TIMEOUT_S) -> Verdict:
    """math-verify equivalence of a gold answer and an extracted prediction (LaTeX strings)."""
    if pred.strip() == gold.strip():
        return Verdict(True)
    return _guarded(_math_verify_job, (gold, pred), timeout)


# ----------------------------------------------------------------------------- MathVision
# The rules below restate MATH-V's evaluation/utils.py and evaluate.py (official scorer).


def _mv_fix_fracs(s: str) -> str:
    parts = s.split("\\frac")
    out = parts[0]
    for sub in parts[1:]:
        out += "\\frac"
        if sub and sub[0] == "{":
            out += sub
            continue
        if len(sub) < 2:
            return s
        a, b = sub[0], sub[1]
        if b != "{":
            out += "{" + a + "}{" + b + "}" + sub[2:]
        else:
            out += "{" + a + "}" + b + sub[2:]
    return out


def _mv_fix_a_slash_b(s: str) -> str:
    if len(s.split("/")) != 2:
        return s
    a, b = s.split("/")
    try:
        ia, ib = int(a), int(b)
    except ValueError:
        return s
    if s != f"{ia}/{ib}":
        return s
    return "\\frac{" + str(ia) + "}{" + str(ib) + "}"


def _mv_fix_sqrt(s: str) -> str:
    if "\\sqrt" not in s:
        return s
    parts = s.split("\\sqrt")
    out = parts[0]
    for sub in parts[1:]:
        if sub and sub[0] != "{":
            out += "\\sqrt{" + sub[0] + "}" + sub[1:]
        else:
            out += "\\sqrt" + sub
    return out


def _mv_strip_string(s: str) -> str:
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = s.split("\\text{ ")[0]  # units on the right
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2:
        s = s.split("=")[-1]
    if len(s.split("\\approx")) == 2:
        s = s.split("\\approx")[-1]
    if "sqrt" in s:
        s = _mv_fix_sqrt(s)
    s = s.replace(" ", "")
    if "sqrt" in s:  # the official code only fixes fractions when a sqrt is present
        s = _mv_fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _mv_fix_a_slash_b(s)


def mathvision_find_answer(s: str) -> str:
    """MathVision's ``find_math_answer``: greedy ``oxed{...}`` content, the part after the last
    ``=``/``\\approx``, LaTeX and unit clean-up, then MATH-style string normalisation."""
    s = s.lower().replace("{}", "")
    found = re.findall(r"oxed{(.*)}", s, flags=re.S)
    ans = found[-1] if found else s
    if ans.find("}") != -1 and (ans.find("{") == -1 or ans.find("}") < ans.find("{")):
        ans = ans.split("}")[0]
    ans = ans.split("=")[-1].split("\\approx")[-1]
    for old, new in (
        (" ", ""),
        ("\\,", ""),
        ("∞", "\\infty"),
        ("+\\infty", "\\infty"),
        ("\\\\", "\\"),
        ("\n", ""),
        ("\\text", ""),
        ("\\mbox", ""),
        ("bmatrix", "pmatrix"),
        ("\\left", ""),
        ("\\right", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("{m}^3", ""),
        ("m^3", ""),
        ("{units}", ""),
        ("units", ""),
        ("{km}", ""),
        ("km", ""),
    ):
        ans = ans.replace(old, new)
    return _mv_strip_string(ans)


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


_MV_FLAGS = (
    "the final answer is",
    "the answer is",
    "the correct answer is",
    "the answer should be",
)


def mathvision_extract(response: str) -> tuple[str, str]:
    """MathVision's official answer extraction; returns ``(answer, rule)``.

    Rules in the official order: a trailing/leading option letter (``letter``), a number after
    the last ``is `` (``is_number``), answer phrases when no box is present (``answer_flag``), or
    the last box (``boxed``); ``raw`` when none fired. The result then goes through
    :func:`mathvision_find_answer` and the official letter clean-up.
    """
    ans = response.strip()
    rule = "raw"
    for c in "ABCDE":
        if (
            ans.endswith(f" {c}.")
            or ans.endswith(f" ({c}).")
            or ans.startswith(f"{c}\n")
            or ans.startswith(f"({c})\n")
            or ans.startswith(f"({c}) {c}\n")
        ):
            ans, rule = c, "letter"
    tail = ans.split("is ")[-1].rstrip(".")
    if _is_float(tail):
        ans, rule = tail, "is_number"
    if "oxed{" not in ans:
        for flag in _MV_FLAGS:
            for f in (flag, flag.replace("the", "The")):
                raw = ans
                ans = ans.split(f)[-1].strip()
                if f in raw:
                    ans = ans.split("\n")[0].split(". ")[0]
                    rule = "answer_flag"
    else:
        rule = "boxed"
        if ans.count("oxed{") > 1:
            ans = "\\boxed{" + ans.split("oxed{")[-1]
    ans = mathvision_find_answer(ans)
    for letter in "abcde":
        ans = ans.replace(f"({letter})", letter).replace("{" + letter + "}", letter)
    return ans.rstrip(".").lstrip(":").strip(), rule


def _mv_number(s: str) -> float:
    from latex2sympy2_extended import latex2sympy

    return float(latex2sympy(s).evalf())


def _mv_eval_tuple(s: str) -> str:
    """Round each element of a ``(a,b)``/``[a,b]`` answer to 2 decimals, as the official code."""
    parts = s[1:-1].split(",")
    try:
        if len(parts) > 1 and s[0] + s[-1] in ("()", "[]"):
            vals = [
                sub if "infty" in sub or sub in ("a", "-a") else str(round(_mv_number(sub), 2))
                for sub in parts
            ]
            return s[0] + ",".join(vals) + s[-1]
    except Exception:
        return s
    return s


def _mathvision_equal_job(gold: str, pred: str) -> bool:
    """Runs in the worker: MathVision's ``is_equal`` (string, tuple, then numeric to 2 dp)."""
    pred, gold = pred.lower(), gold.lower()
    if not pred.replace(" ", "") or not gold.replace(" ", ""):
        return False
    if gold.strip() == pred.strip():
        return True
    pred, gold = _mv_eval_tuple(pred), _mv_eval_tuple(gold)
    if gold == pred:
        return True
    try:
        return round(_mv_number(gold), 2) == round(_mv_number(pred), 2)
    except Exception:
        return False


def mathvision_equal(
    gold: str, gold_option: str, pred: str, timeout: float = DEFAULT_TIMEOUT_S
) -> Verdict:
    """Correct if ``pred`` equals the gold letter/value or the option text behind the letter."""
    for g in (gold, gold_option):
        if (
            g.replace(" ", "")
            and pred.replace(" ", "")
            and g.lower().strip() == pred.lower().strip()
        ):
            return Verdict(True)
    timed_out = False
    for g in (gold, gold_option):
        v = _guarded(_mathvision_equal_job, (g, pred), timeout)
        if v.correct:
            return v
        timed_out = timed_out or v.timed_out
    return Verdict(False, timed_out=timed_out)


# ----------------------------------------------------------------------------- MMMU parsers
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


def mmmu_extract_numbers(s: str) -> list[str]:
    """Comma-grouped, scientific and plain numbers, in that order (official patterns)."""
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
    also counts in the last line), plus every number in those tails, normalised."""
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
        for n in mmmu_normalize(p):
            if n not in out:
                out.append(n)
    return out


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


# ----------------------------------------------------------------------------- edit distance


def levenshtein(a: str, b: str) -> int:
    """Plain edit distance (MathVista maps a free-text choice to the nearest option by it)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]
