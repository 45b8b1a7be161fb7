"""AMO-Bench (``meituan-longcat/AMO-Bench``, test, 50 problems), official parser grading.

Prompt: the row's own ``prompt`` verbatim (it carries AMO-Bench's answer-format instruction).

Extraction restates AMO-Bench's utils.py: the text after the last ``</think>``, then after the
last ``### The final answer is:`` (or its variants), with LaTeX sizing commands and full-width
punctuation cleaned. ``number``/``set`` answers: math-verify both ways with float rounding 4 (and
the right-hand side of a trailing ``=``); ``variable`` answers: substitute the official sample
values (problems 5 and 37) and compare the solved ``y``; each also retried on the answer cut at
``\\medskip``/``---``. All of it runs in the grading worker under a timeout.

``description`` answers (11 of 50) need AMO-Bench's LLM judge. Without a judge they are not
graded (``rule: needs_judge``) and the headline is AMO-Bench-P, the 39 parser-gradable problems.
With a judge the full accuracy is reported too: a :class:`~opsd_mm.eval.judge.Judge`
(``opsd-mm eval --judge-url URL --judge-model NAME``) gets the official judge prompt
(:data:`SCORE_PROMPT`, byte for byte, filled and truncated as ``verify_description_answer``
does) five times at the official temperature 1.0 and 8,192 tokens, each reply is read by the
official conclusion rule, and the majority decides (``rule: judge``, ``votes``); a
``judge(question, gold, extracted) -> bool`` callable is the older hook. The official code asks
o4-mini with ``reasoning_effort="low"``; that parameter is not sent (other endpoints reject it).

An answer beyond symbolic evaluation (an exponent tower, a huge integer) is compared as a
normalised string instead of by math-verify and counted (``graded_by_guard``); the official code
would spend its deadline on it and score 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets

from opsd_mm.eval import grading, metrics
from opsd_mm.eval.benchmarks._common import load_rows
from opsd_mm.eval.judge import Judge, JudgeRequest
from opsd_mm.types import Example

JudgeHook = Callable[[str, str, str], bool]
PARSER_TYPES = ("number", "set", "variable")

# AMO-Bench's judge prompt, byte for byte: meituan-longcat/AMO-Bench, utils.py (SCORE_PROMPT) at
# commit 52e1f378e4bcb0c593e860be38f9251b1a192571 (file last changed in e87664784a12);
# tests/eval/test_eval_judge.py checks its SHA-256.
SCORE_PROMPT = """
For the following math problem, we have the reference answer and the student's answer.
Determine whether the student's answer is equivalent to the reference answer.
If equivalent, output "Correct".
If not equivalent, output "Incorrect".

### Problem
QUESTION

### Reference Answer
GOLD

### Student Answer
PRED

Now, please provide your judgment.
Please strictly follow the format below to summarize your conclusion at the end of your judgment:
### Conclusion: Correct/Incorrect
If the answer involves a decimal approximation, it must be accurate to at least four decimal places.
""".strip()
# The official call_api settings and vote count (verify_description_answer).
JUDGE_TEMPERATURE, JUDGE_MAX_TOKENS, JUDGE_VOTES = 1.0, 8192, 5


def judge_prompt(question: str, gold: str, pred: str) -> str:
    """The official filling: GOLD, then PRED, then QUESTION replaced in that order (so a
    placeholder word inside an earlier value is replaced too, as officially), and a prompt of
    20,000 characters or more cut to its first and last 10,000."""
    prompt = SCORE_PROMPT.replace("GOLD", gold).replace("PRED", pred).replace("QUESTION", question)
    if len(prompt) >= 20000:
        prompt = prompt[:10000] + "\n\n...\n\n" + prompt[-10000:]
    return prompt


def judge_vote(reply: str) -> bool:
    """The official reading of one reply: the text after the last ``conclusion:``, lowercased,
    holds the word ``correct`` and neither ``not correct`` nor ``n't correct``."""
    conclusion = reply.lower().split("conclusion:")[-1]
    return (
        "correct" in conclusion.split()
        and "not correct" not in conclusion
        and "n't correct" not in conclusion
    )


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
_SPACES_BEFORE_BRACE = re.compile(r" +\}")
_DOTS_BEFORE_BRACE = re.compile(r"\.+\}")
# Official sample values for the two "variable" problems (AMO-Bench utils.append_try_list).
TRY_LISTS = {
    5: [f"n={i}" for i in range(1, 21)],
    37: [f"a={i},b={i + 1},c={i + 2}" for i in range(2, 19)],
}


def strip_before_brace(s: str) -> str:
    """The official loops replace " }" (then ".}") until none is left, one character of a run
    per pass (quadratic on a long run); removing whole runs gives the same text in one pass."""
    return _DOTS_BEFORE_BRACE.sub("}", _SPACES_BEFORE_BRACE.sub("}", s))


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
    s = strip_before_brace(s)
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
        judge: Judge | JudgeHook | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.name, self.split, self.judge, self.timeout = name, split, judge, timeout
        self.headline: tuple[str, ...] = ("amo_bench_p",) + (("accuracy",) if judge else ())
        if isinstance(judge, Judge):
            self.label = (
                f"official grading; description answers judged by {judge.model} with "
                f"AMO-Bench's judge prompt (majority of {JUDGE_VOTES})"
            )
        elif judge is not None:
            self.label = "official parser grading; description answers by the supplied judge"
        else:
            self.label = (
                "AMO-Bench-P (official parser grading of the 39 parser-gradable problems); "
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

    def judge_requests(self, item: dict[str, Any], response: str) -> list[JudgeRequest]:
        """The votes the judge must cast before :meth:`score` can grade ``response``."""
        if not isinstance(self.judge, Judge) or item["answer_type"] != "description":
            return []
        prompt = judge_prompt(item["prompt"], str(item["answer"]), extract(response, "description"))
        return [
            JudgeRequest(prompt, JUDGE_TEMPERATURE, JUDGE_MAX_TOKENS, sample=k)
            for k in range(JUDGE_VOTES)
        ]

    def score(self, item: dict[str, Any], response: str) -> dict[str, Any]:
        kind = item["answer_type"]
        pred = extract(response, kind)
        if kind == "description":
            if self.judge is None:
                return {"correct": False, "extracted": pred, "rule": "needs_judge", "graded": False}
            if isinstance(self.judge, Judge):
                return self._score_judged(item, response, pred)
            ok = bool(self.judge(item["prompt"], str(item["answer"]), pred))
            return {"correct": ok, "extracted": pred, "rule": "judge", "graded": True}
        by_guard = grading.guard_verdict(str(item["answer"]), pred)
        if by_guard is not None:
            return {
                "correct": by_guard.correct,
                "extracted": pred,
                "rule": "parser",
                "graded": True,
                "timed_out": False,
                "graded_by_guard": True,
            }
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

    def _score_judged(self, item: dict[str, Any], response: str, pred: str) -> dict[str, Any]:
        assert isinstance(self.judge, Judge)
        where = f"{self.name} item {self.item_id(item)}"
        requests = self.judge_requests(item, response)
        replies = [self.judge.reply(r, where) for r in requests]
        votes = [judge_vote(r.text) for r in replies]
        return {
            "correct": votes.count(True) > votes.count(False),
            "extracted": pred,
            "rule": "judge",
            "graded": True,
            "votes": votes.count(True),
            "judge": [self.judge.entry(q, r) for q, r in zip(requests, replies)],
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
        if isinstance(self.judge, Judge):
            out.update(metrics.judge_counts(records))
        return out

    def default_sampling(self, samples: int) -> dict[str, Any]:
        return {"temperature": 0.0} if samples == 1 else {"temperature": 1.0}
