"""Shared grading rules: boxed extraction, math-verify under a process-level timeout,
MathVision's normalisation and MMMU's parsers (restated from the official code)."""

from __future__ import annotations

import random
import time

import pytest

from opsd_mm.eval import grading as g


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{a}{b^{2}}} done", "\\frac{a}{b^{2}}"),
        ("first \\boxed{1} then \\boxed{\\sqrt{\\frac{1}{2}}}", "\\sqrt{\\frac{1}{2}}"),
        ("sets \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed {7}", "7"),
        ("\\boxed{3} then a cut-off \\boxed{\\frac{1}{", "3"),  # last box unbalanced
        ("no box here", None),
        ("\\fbox{5}", None),  # only \boxed by default
    ],
)
def test_last_boxed(text, expected):
    assert g.last_boxed(text) == expected


def test_last_boxed_accepts_fbox_when_asked():
    assert g.last_boxed("\\boxed{1} and \\fbox{2}", ("boxed", "fbox")) == "2"


@pytest.mark.parametrize(
    "gold, pred, ok",
    [
        ("\\frac{1}{2}", "0.5", True),
        ("0.5", "\\frac{1}{2}", True),
        ("\\frac{\\sqrt{3}}{4}", "\\frac{1}{4}\\sqrt{3}", True),
        ("\\{-2, 2\\}", "\\{2, -2\\}", True),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True),
        ("24", "25", False),
        ("24", "", False),
    ],
)
def test_math_equal(gold, pred, ok):
    v = g.math_equal(gold, pred)
    assert v.correct is ok and not v.timed_out


def test_timeout_kills_the_call_and_the_worker_recovers():
    t0 = time.monotonic()
    assert g.call_with_timeout(time.sleep, (30,), timeout=0.5) == ("timeout", None)
    assert time.monotonic() - t0 < 10
    # The next call gets a fresh worker.
    assert g.math_equal("\\frac{1}{2}", "0.5").correct


def test_timed_out_check_scores_zero_and_says_so(monkeypatch):
    monkeypatch.setattr(g, "call_with_timeout", lambda fn, args, timeout: ("timeout", None))
    assert g.math_equal("\\frac{1}{2}", "0.5") == g.Verdict(False, timed_out=True)
    assert g.mathvision_equal("2\\sqrt{3}", "", "3.46") == g.Verdict(False, timed_out=True)


def test_worker_reports_errors_without_dying():
    status, msg = g.call_with_timeout(int, ("not a number",), timeout=5)
    assert status == "error" and "ValueError" in msg
    assert g.call_with_timeout(abs, (-3,), timeout=5) == ("ok", 3)


# ----------------------------------------------------------------------------- MathVision


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


# ----------------------------------------------------------------------------- MMMU

CHOICES = ["A", "B", "C", "D"]
INDEX2ANS = dict(zip(CHOICES, ["Nucleus", "Ribosome", "Mitochondrion", "Golgi body"]))


@pytest.mark.parametrize(
    "response, letter, rule",
    [
        ("(B)", "B", "bracket"),
        ("(A) looks tempting, but (C) is right. Final: (B) after all", "B", "bracket"),
        ("(C) first... then A and (A)", "A", "bracket"),  # rightmost "(X)" wins
        ("The answer is D.", "D", "space"),
        ("B or C? I pick C", "C", "space"),
        ("I believe the organelle shown is the mitochondrion here", "C", "option_text"),
        ("ribosome nucleus", None, "random"),  # <= 5 words: option text is not tried
    ],
)
def test_mmmu_multiple_choice(response, letter, rule):
    got, fired = g.mmmu_parse_choice(response, CHOICES, INDEX2ANS, item_id="validation_Bio_1")
    assert fired == rule
    if letter is not None:
        assert got == letter


def test_mmmu_random_fallback_is_seeded_per_item():
    picks = {
        iid: g.mmmu_parse_choice("no idea", CHOICES, INDEX2ANS, item_id=iid)
        for iid in ("validation_Math_1", "validation_Math_2", "validation_Art_7")
    }
    for iid, (letter, rule) in picks.items():
        assert rule == "random"
        assert letter == random.Random(f"42:{iid}").choice(CHOICES)
        assert g.mmmu_parse_choice("no idea", CHOICES, INDEX2ANS, item_id=iid)[0] == letter
    other = g.mmmu_parse_choice("??", CHOICES, INDEX2ANS, item_id="validation_Math_1", seed=7)
    assert other[0] == random.Random("7:validation_Math_1").choice(CHOICES)


def test_mmmu_open_the_answer_is_1297_is_right():
    # lmms-eval keeps only the first parsed string and marks this wrong; MMMU's rule does not.
    preds = g.mmmu_parse_open("The answer is 12.97")
    assert 12.97 in preds
    assert g.mmmu_open_correct(["12.97"], preds)


@pytest.mark.parametrize(
    "response, gold, ok",
    [
        ("The answer is 12.97", "12.97", True),
        ("Thus the current is 12.970 A.", "12.97", True),
        ("so the total is 1,234.5", "1234.5", True),
        ("It equals 3e-3 metres", "0.003", True),
        ("The answer is 13", "12.97", False),
        ("Therefore the color is blue", "blue", True),
        ("Therefore the color is light blue", "blue", True),  # official: gold inside the pred
        ("The final letter is c", "c", True),
        ("The final letter is cat", "c", False),  # single characters are padded with spaces
        ("x = 5\ny = 7", "7", True),  # '=' is an indicator in the last line only
    ],
)
def test_mmmu_open(response, gold, ok):
    assert g.mmmu_open_correct(g.mmmu_gold_list(gold), g.mmmu_parse_open(response)) is ok


def test_mmmu_gold_list_literal():
    assert g.mmmu_gold_list("['0.5', '1/2']") == ["0.5", "1/2"]
    assert g.mmmu_gold_list("[not a list") == ["[not a list"]
    assert g.mmmu_open_correct(g.mmmu_gold_list("['0.5', '1/2']"), g.mmmu_parse_open("1/2"))
    assert g.mmmu_open_correct(g.mmmu_gold_list("['0.5', '1/2']"), g.mmmu_parse_open("0.50"))


def test_mmmu_extract_numbers_patterns():
    # Comma-grouped first, then scientific, then plain numbers (the patterns may overlap).
    got = g.mmmu_extract_numbers("1,000 and 2.5e3 and -7 and .5")
    assert got[:2] == ["1,000", "2.5e3"]
    assert {"-7", ".5"} <= set(got[2:])


def test_levenshtein():
    assert g.levenshtein("kitten", "sitting") == 3
    assert g.levenshtein("", "abc") == 3
