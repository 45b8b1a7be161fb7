"""The training rewards (opsd_mm.eval.rewards) in the real grading worker."""

import time

from opsd_mm.eval.rewards import ChoiceReward, MathVerifyReward, build_reward, choice_letter
from opsd_mm.loss.rewards import Reward, group_advantages, reward_metrics
from opsd_mm.types import Example


def _slow_job(gold, pred):
    """A checker that never finishes in time: what adversarial output does to latex2sympy."""
    time.sleep(30)
    return True


def _ex(answer):
    return Example(id="x", question="q", answer=answer)


def test_math_reward_scores_and_names_failures():
    reward = build_reward("math", timeout=30)
    assert isinstance(reward, Reward)
    scores = reward(
        [_ex("0.5"), _ex("6"), _ex("6"), _ex(None)],
        ["so \\boxed{\\frac{1}{2}}", "\\boxed{6}", "no box: 6", "\\boxed{6}"],
    )
    assert [s.value for s in scores] == [1.0, 1.0, 0.0, 0.0]
    assert [s.failure for s in scores] == [None, None, "no_answer", "no_gold"]


def test_reward_timeouts_are_counted_in_the_real_worker():
    reward = MathVerifyReward(timeout=0.5, job=_slow_job)
    t0 = time.perf_counter()
    scores = reward([_ex("1"), _ex("2")], ["\\boxed{x}", "\\boxed{2}"])
    assert time.perf_counter() - t0 < 20  # killed at the deadline, not after 30 s
    assert [(s.value, s.failure) for s in scores] == [(0.0, "timeout"), (1.0, None)]
    import torch

    r_PG = torch.tensor([[s.value for s in scores]])
    _, zero_P = group_advantages(r_PG)
    assert reward_metrics(r_PG, zero_P, scores)["reward/failed_timeout"] == 1
    # the worker restarts after the kill: the next call is scored normally
    assert MathVerifyReward(timeout=30)([_ex("2")], ["\\boxed{4/2}"])[0].value == 1.0


def test_choice_reward():
    assert choice_letter("I pick \\boxed{B}") == "B"
    assert choice_letter("\\boxed{\\text{C}}") == "C"
    assert choice_letter("It is (A) or maybe (D)") == "D"
    assert choice_letter("The answer is c.") == "C"
    assert choice_letter("no idea") is None
    scores = ChoiceReward()([_ex("B"), _ex("(C)"), _ex("A")], ["\\boxed{B}", "(C)", "hmm"])
    assert [(s.value, s.failure) for s in scores] == [(1.0, None), (1.0, None), (0.0, "no_answer")]
