"""MathVision's scoring rules (restated from MATH-V's evaluate.py)."""

from __future__ import annotations

import pytest

from opsd_mm.eval import grading
from opsd_mm.eval.benchmarks import _mathvision_rules as g


def test_timed_out_check_scores_zero_and_says_so(monkeypatch):
    monkeypatch.setattr(grading, "call_with_timeout", lambda fn, args, timeout: ("timeout", None))
    assert g.mathvision_equal("2\\sqrt{3}", "", "3.46") == grading.Verdict(False, timed_out=True)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("\\boxed{x = 5}", "5"),
        ("\\boxed{30^\\circ}", "30"),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}"),
        ("\\boxed{1/2}", "\\frac{1}{2}"),
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{12}\\text{ cm}", "12"),
        ("\\boxed{12 \\text{ cm}}", "12{cm}"),  # official: spaces go before units are cut
        ("\\boxed{\\$5}", "5"),
        ("\\boxed{2\\sqrt3}", "2\\sqrt{3}"),
    ],
)
def test_mathvision_find_answer(raw, expected):
    assert g.mathvision_find_answer(raw) == expected


@pytest.mark.parametrize(
    "response, answer, rule",
    [
        ("Let me think... \\boxed{B}", "b", "boxed"),
        ("First \\boxed{3}, no wait \\boxed{4}", "4", "boxed"),
        ("The shape has 5 sides, so the answer is 5.", "5", "is_number"),
        ("Reasoning.\nThe final answer is C. Because of symmetry.", "c", "answer_flag"),
        ("Looking at the figure, the answer is (D).", "d", "letter"),
        ("C\nbecause it is the largest", "c", "letter"),
        ("I cannot tell", "icannottell", "raw"),
    ],
)
def test_mathvision_extract(response, answer, rule):
    assert g.mathvision_extract(response) == (answer, rule)


def test_mathvision_equal_letter_value_and_option_text():
    assert g.mathvision_equal("B", "4", "b").correct  # the gold letter
    assert g.mathvision_equal("B", "4", "4").correct  # the option text behind it
    assert not g.mathvision_equal("B", "4", "c").correct
    assert g.mathvision_equal("2\\sqrt{3}", "", "3.46").correct  # numeric, 2 decimals
    assert not g.mathvision_equal("2\\sqrt{3}", "", "3.5").correct
    assert g.mathvision_equal("(1,2)", "", "(1.001,2)").correct  # tuples, element-wise
