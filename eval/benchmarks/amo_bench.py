"""AMO-Bench (``meituan-longcat/AMO-Bench``, test, 50 problems), official parser grading.

Prompt: the row's own ``prompt`` verbatim (it carries AMO-Bench's answer-format instruction).

Extraction restates AMO-Bench's utils.py: the text after the last ``</think>``, then after the
last ``### The final answer is:`` (or its variants), with LaTeX sizing commands and full-width
punctuation cleaned. ``number``/``set`` answers: math-verify both ways with float rounding 4 (and
the right-hand side of a trailing ``=``); ``variable`` answers: substitute the official sample
values (problems 5 and 37) and compare the solved ``y``; each also retried on the answer cut at
``\\medskip``/``---``. All of it runs in the grading worker under a timeout.

``description`` answers (11 of 50) need AMO-Bench's LLM judge. Without a ``judge`` hook they are
not graded (``rule: needs_judge``) and the headline is AMO-Bench-P, the 39 parser-gradable
problems. With ``judge(question, gold, extracted) -> bool`` the full accuracy is reported too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets

from opsd_mm.eval import grading, metrics
from opsd_mm.eval.benchmarks._common import load_rows
from opsd_mm.types import Example

Judge = Callable[[str, str, str], bool]
PARSER_TYPES = ("number", "set", "variable")

_PREFIXES = [
    "### the final answer is:",
    "### the final answer:",
    "### final answer is:",
    "### final answer:",
    "### the final answer is",
    "### the final answer",
    "### final answer is",
    "### final answer",
]
_PREFIXES += [p[4:] for p in _PREFIXES]
_THINK_ENDS = ("</think>", "</longcat_think>")
_REMOVE = [
    *("\\bigl", "\\bigr", "\\Bigl", "\\Bigr", "\\biggl", "\\biggr", "\\Biggl", "\\Biggr"),
    *("\\bigg", "\\Bigg", "\\big", "\\Big", "\\left", "\\right"),
]
_REPLACE = [
    ("‘", "'"),
    ("’", "'"),
    ("“", '"'),
    ("”", '"'),
    ("（", "("),
    ("）", ")"),
    ("，", ", "),
    ("：", ": "),
    ("；", "; "),
    ("。", ". "),
    ("！", "! "),
    ("？", "? "),
    ("…", "..."),
    ("–", "-"),
    ("−", "-"),
]
# Official sample values for the two "variable" problems (AMO-Bench utils.append_try_list).
TRY_LISTS = {
    5: [f"n={i}" for i in range(1, 21)],
    37: [f"a={i},b={i + 1},c={i + 2}" for i in range(2, 19)],
}


def extract(response: str, answer_type: str) -> str:
    """AMO-Bench's ``pred_extractor``."""
    s = response.replace("：", ": ")
    for end in _THINK_ENDS:
        s = s.split(end)[-1].strip()
    for prefix in _PREFIXES:
        if prefix in s.lower():
            tail = s.lower().split(prefix)[-1]
            s = s[-len(tail) :].strip()  # an empty tail keeps the whole text, as officially
            break
    if answer_type != "description":
        for pat in _REMOVE:
            s = s.replace(pat, "")
    for old, new in _REPLACE:
        s = s.replace(old, new)
    while " }" in s:
        s = s.replace(" }", "}")
    while ".}" in s:
        s = s.replace(".}", "}")
    if answer_type in PARSER_TYPES:
        s = s.replace("\\,", "").replace("\\;", "").replace("\n", " ")
    if answer_type in ("number", "variable"):
        s = s.replace(",", "")
        s = s.replace("\\{", "(").replace("\\}", ")").replace("\\[", "(").replace("\\]", ")")
    return s.strip()


def cut(s: str) -> str:
    """AMO-Bench's ``pred_cut``: drop anything after ``\\medskip`` or a ``---`` rule."""
    for pat in ("\\medskip", "\n---"):
        s = s.split(pat)[0].strip()
    return s


def _verify_number_set(pred: str, gold: str) -> bool:
    from math_verify import parse, verify

    def both(a: Any, b: Any) -> bool:
        return bool(
            verify(a, b, float_rounding=4, timeout_seconds=None)
            or verify(b, a, float_rounding=4, timeout_seconds=None)
        )

    pred_p = parse(pred, parsing_timeout=None)
    gold_p = parse(gold, parsing_timeout=None)
    ok = both(gold_p, pred_p)
    if pred_p and "=" in str(pred_p[-1]):
        last = parse("\\boxed{" + str(pred_p[-1]).split("=")[-1] + "}", parsing_timeout=None)
        ok = ok or both(gold_p, last)
    return ok


def _solve_y(expr: Any) -> Any:
    from sympy import solve

    sol = solve(expr)
    if isinstance(sol, list):
        sol = sol[0] if sol else None
    if not sol:
        return None
    for sym in sol:
        if str(sym) == "y":
            return sol[sym]
    return None


def _verify_variable(pred: str, gold: str, try_list: Sequence[str]) -> bool:
    from math_verify import parse, verify

    pred_p = parse(pred, parsing_timeout=None)
    if not pred_p or not try_list:
        return False
    p = str(pred_p[-1])
    p = p.split("\\qquad")[-2].strip() if "\\qquad" in p else p
    p = p.split("\\quad")[-2].strip() if "\\quad" in p else p
    p = p.split("=")[-1]
    g = str(parse(gold, parsing_timeout=None)[-1]).split("=")[-1]
    for t in try_list:
        pred_eq = parse("\\boxed{" + t + ", y=" + p + "}", parsing_timeout=None)
        gold_eq = parse("\\boxed{" + t + ", y=" + g + "}", parsing_timeout=None)
        try:
            py = _solve_y(pred_eq[0])
        except Exception:
            return False
        gy = _solve_y(gold_eq[0])
        if py is None or gy is None:
            return False
        py, gy = py.evalf(), gy.evalf()
        ok = verify(gy, py, float_rounding=8, timeout_seconds=None) or verify(
            py, gy, float_rounding=8, timeout_seconds=None
        )
        if not ok:
            return False
    return True


def _amo_job(pred: str, gold: str, answer_type: str, try_list: Sequence[str]) -> bool:
    """Runs in the grading worker: the official check on the answer and on its cut form."""
    for candidate in (pred, cut(pred)):
        try:
            if answer_type == "variable":
                ok = _verify_variable(candidate, gold, try_list)
            else:
                ok = _verify_number_set(candidate, gold)
        except Exception:
            ok = False
        if ok:
            return True
    return False


class AMOBench:
    hub_id = "meituan-longcat/AMO-Bench"
    id_columns = ("question_id",)

    def __init__(
        self,
        name: str = "amo_bench",
        split: str = "test",
        judge: Judge | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.name, self.split, self.judge, self.timeout = name, split, judge, timeout
        self.headline: tuple[str, ...] = ("amo_bench_p",) + (("accuracy",) if judge else ())
        self.label = (
            "official parser grading; description answers by the supplied judge"
            if judge
            else "AMO-Bench-P (official parser grading of the 39 parser-gradable problems); "
            "description answers need an LLM judge and are not graded"
        )

    def load(self, data_dir: str | Path | None = None) -> datasets.Dataset:
        return load_rows(self.name, self.hub_id, self.split, data_dir)

    def item_id(self, item: dict[str, Any]) -> str:
        return str(item["question_id"])

    def categories(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"answer_type": item["answer_type"]}

    def prompt(self, item: dict[str, Any]) -> Example:
        return Example(
            id=self.item_id(item),
            question=item["prompt"],
            answer=str(item["answer"]),
            meta={"benchmark": self.name, **self.categories(item)},
        )

    def score(self, item: dict[str, Any], response: str) -> dict[str, Any]:
        kind = item["answer_type"]
        pred = extract(response, kind)
        if kind == "description":
            if self.judge is None:
                return {"correct": False, "extracted": pred, "rule": "needs_judge", "graded": False}
            ok = bool(self.judge(item["prompt"], str(item["answer"]), pred))
            return {"correct": ok, "extracted": pred, "rule": "judge", "graded": True}
        try_list = TRY_LISTS.get(int(item["question_id"]), []) if kind == "variable" else []
        status, value = grading.call_with_timeout(
            _amo_job, (pred, str(item["answer"]), kind, try_list), self.timeout
        )
        return {
            "correct": status == "ok" and bool(value),
            "extracted": pred,
            "rule": "timeout" if status == "timeout" else "parser",
            "graded": True,
            "timed_out": status == "timeout",
        }

    def aggregate(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        p_subset = [r for r in records if r["meta"].get("answer_type") in PARSER_TYPES]
        out: dict[str, Any] = {
            **metrics.base_counts(records),
            "label": self.label,
            "amo_bench_p": metrics.sample_metrics(p_subset)["accuracy"] if p_subset else 0.0,
            "n_p": len(p_subset),
            "n_description": len(records) - len(p_subset),
            "by_answer_type": metrics.grouped_accuracy(
                records if self.judge is not None else p_subset, "answer_type"
            ),
        }
        k = metrics.num_samples(records)
        if k > 1 and p_subset:
            out[f"amo_bench_p_pass@{k}"] = metrics.pass_at_k(metrics.correct_matrix(p_subset), k)
        if self.judge is not None:
            out.update(metrics.sample_metrics(records))
        return out

    def default_sampling(self, samples: int) -> dict[str, Any]:
        return {"temperature": 0.0} if samples == 1 else {"temperature": 1.0}
