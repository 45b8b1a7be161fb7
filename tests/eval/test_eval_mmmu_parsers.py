"""MMMU's answer parsers (restated from MMMU's eval_utils)."""

from __future__ import annotations

import random

import pytest

from opsd_mm.eval.benchmarks import mmmu as g

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
