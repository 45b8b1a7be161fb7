"""Training rewards for ``loss.reward_weight`` (the ``opsd_mm.loss.rewards.Reward`` interface), built
on evaluation's grading so that training and evaluation score an answer the same way.

- :class:`MathVerifyReward` (``loss.reward=math``): the last ``\\boxed{}`` of the completion,
  math-verify against the example's ``answer`` (gold first) in the grading worker, a deadline per
  item. Text and VL completions alike (the reward sees only text and the gold answer).
- :class:`ChoiceReward` (``loss.reward=choice``): the option letter of the completion (the last
  ``\\boxed{X}``, else the last ``(X)`` or ``answer is X``), against the gold letter. Unlike
  MMMU's evaluation parser it never guesses a random letter: a reward must be deterministic.

An answer beyond symbolic evaluation (an exponent tower such as ``9^{9^{9^9}}``, a digit run of
more than 4,300 digits) is compared with the gold answer as a normalised string instead of by
math-verify, and counted (``RewardScore.graded_by_guard``: ``reward/graded_by_guard``).

Reward 1 for a correct answer, 0 otherwise. Failures score 0 and are named in
``RewardScore.failure`` so that the trainer counts them: ``timeout`` (math-verify past its
deadline: the worker is killed and restarted), ``error`` (math-verify raised), ``no_answer``
(nothing to extract), ``no_gold`` (the example has no ``answer``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from opsd_mm.eval import grading
from opsd_mm.loss.rewards import RewardScore
from opsd_mm.types import Example


class MathVerifyReward:
    """math-verify on the last ``\\boxed{}``; ``job(gold, pred) -> bool`` runs in the grading
    worker under ``timeout`` seconds (the default is math-verify itself; tests pass a slow one)."""

    name = "math"

    def __init__(
        self,
        timeout: float = grading.DEFAULT_TIMEOUT_S,
        job: Callable[[str, str], Any] = grading._math_verify_job,
    ) -> None:
        self.timeout, self.job = timeout, job

    def score(self, ex: Example, completion: str) -> RewardScore:
        if ex.answer is None:
            return RewardScore(0.0, "no_gold")
        pred = grading.last_boxed(completion)
        if pred is None:
            return RewardScore(0.0, "no_answer")
        if pred.strip() == ex.answer.strip():  # the common case: no worker round trip
            return RewardScore(1.0)
        by_guard = grading.guard_verdict(ex.answer, pred)  # a tower would sit at the deadline
        if by_guard is not None:
            return RewardScore(float(by_guard.correct), graded_by_guard=True)
        verdict = grading.guarded(self.job, (ex.answer, pred), self.timeout)
        if verdict.timed_out:
            return RewardScore(0.0, "timeout")
        if verdict.error is not None:
            return RewardScore(0.0, "error")
        return RewardScore(float(verdict.correct))

    def __call__(
        self, examples: Sequence[Example], completions: Sequence[str]
    ) -> list[RewardScore]:
        return [self.score(ex, c) for ex, c in zip(examples, completions, strict=True)]


_LETTER_PATTERNS = (
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"answer is:?\s*\(?([A-Z])\b", re.IGNORECASE),
)


def choice_letter(text: str) -> str | None:
    """The option letter a completion commits to: the last ``\\boxed{X}``, else the last
    ``(X)``, else the last ``answer is X``; None when there is none."""
    boxed = grading.last_boxed(text)
    if boxed is not None:
        m = re.fullmatch(r"\s*\(?([A-Za-z])\)?\s*", boxed.replace("\\text{", "").rstrip("}"))
        return m.group(1).upper() if m else None
    for pattern in _LETTER_PATTERNS:
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    return None


class ChoiceReward:
    """Multiple choice: 1 when the completion's letter equals the gold letter (``answer``)."""

    name = "choice"

    def __call__(
        self, examples: Sequence[Example], completions: Sequence[str]
    ) -> list[RewardScore]:
        out = []
        for ex, text in zip(examples, completions, strict=True):
            if ex.answer is None:
                out.append(RewardScore(0.0, "no_gold"))
                continue
            letter = choice_letter(text)
            if letter is None:
                out.append(RewardScore(0.0, "no_answer"))
            else:
                out.append(RewardScore(float(letter == ex.answer.strip().strip("()").upper())))
        return out


def build_reward(kind: str, timeout: float = grading.DEFAULT_TIMEOUT_S) -> Any:
    """The reward named by ``loss.reward``."""
    if kind == "math":
        return MathVerifyReward(timeout)
    if kind == "choice":
        return ChoiceReward()
    raise ValueError(f"loss.reward={kind!r}: choose math or choice")
