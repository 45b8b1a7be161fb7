"""We-Math: the official per-row rule, the labelled fallback, and the four-dimensional metrics
on a constructed set of composites with hand-computed values."""

from __future__ import annotations

import pytest

from opsd_mm.eval.benchmarks.wemath import (
    fallback_letter,
    four_dimensional,
    official_letter,
)
from opsd_mm.eval.records import make_record
from opsd_mm.eval.registry import get_benchmark
from tests.fixtures.benchmarks import fixture_rows


@pytest.mark.parametrize(
    "response, letter",
    [
        ("<Thought process>: <<sides>> <Answer>: <<B>>", "B"),
        ("<Answer>: B.", "B"),
        ("Answer: C", "C"),
        ("B", "B"),  # no 'Answer' at all: the whole text is read
        ("The answer is \\boxed{C}", None),  # 'answer' is lowercase: first char is 'T'
        ("<Answer>: <<I am not sure>>", None),
        ("<Answer>: <<H>>", "H"),  # A-H are accepted
        ("Answer: 3", None),
    ],
)
def test_official_rule(response, letter):
    assert official_letter(response) == letter


def test_fallback_is_labelled_and_kept_apart():
    b = get_benchmark("wemath")
    item = fixture_rows("wemath")[0]  # gold B
    s = b.score(item, "The answer is \\boxed{B}")
    assert s == {
        "correct": False,  # the official rule reads nothing
        "correct_with_fallback": True,
        "extracted": "B",
        "rule": "fallback:boxed",
    }
    s = b.score(item, "<Answer>: <<B>>")
    assert s["rule"] == "official" and s["correct"] and s["correct_with_fallback"]
    assert b.score(item, "no idea")["rule"] == "none"
    assert fallback_letter("\\boxed{ D. 5 }") == "D"


def _rows(spec):
    out = []
    for cid, subs, multi in spec:
        steps = len(subs)
        out += [
            {"ID": cid, "key": f"{steps}steps_{i + 1}", "correct": c} for i, c in enumerate(subs)
        ]
        if multi is not None:
            out.append({"ID": cid, "key": f"{steps}steps_multi", "correct": multi})
    return out


T, F = True, False
COMPOSITES = [
    ("a", (T, T), T),  # CM strict + loose
    ("b", (T, T), F),  # IG
    ("c", (T, F), T),  # RM strict, CM loose
    ("d", (F, F), T),  # RM strict + loose
    ("e", (T, F), F),  # IK
    ("f", (F, F), F),  # IK
    ("g", (T, T, T), T),  # CM strict + loose
    ("h", (F, T, T), F),  # IK
    ("i", (T, T), None),  # incomplete (no composite row): not counted
]


def test_four_dimensional_hand_computed():
    m = four_dimensional(_rows(COMPOSITES))
    assert m["n_composites"] == 8
    assert m["counts"] == {
        "IK": 3,
        "IG": 1,
        "CM_strict": 2,
        "CM_loose": 3,
        "RM_strict": 2,
        "RM_loose": 1,
    }
    assert m["score_strict"] == pytest.approx((8 - 0.5 * 1 - 2 - 3) / 8)  # 0.3125
    assert m["score_loose"] == pytest.approx((8 - 0.5 * 1 - 1 - 3) / 8)  # 0.4375
    assert m["IK_rate"] == pytest.approx(3 / 8)
    assert m["IG_rate"] == pytest.approx(1 / 8)
    assert m["CM_strict_rate"] == pytest.approx(2 / 8)
    assert m["CM_loose_rate"] == pytest.approx(3 / 8)
    assert m["RM_strict_rate"] == pytest.approx(2 / (2 + 2))
    assert m["RM_loose_rate"] == pytest.approx(1 / (3 + 1))
    assert m["S1"] == pytest.approx(11 / 18)
    assert m["S2"] == pytest.approx(3 / 6)
    assert m["S3"] == pytest.approx(1 / 2)


def test_aggregate_from_responses_official_and_fallback():
    b = get_benchmark("wemath")
    items = {b.item_id(r): r for r in fixture_rows("wemath")}
    answers = {  # 2-step: subs right, composite right only via fallback; 3-step: all right
        "1:2steps_1": "<Answer>: B",
        "1:2steps_2": "<Answer>: A",
        "1:2steps_multi": "\\boxed{B}",
        "2:3steps_1": "<Answer>: A",
        "2:3steps_2": "<Answer>: B",
        "2:3steps_3": "<Answer>: C",
        "2:3steps_multi": "<Answer>: A",
    }
    recs = [make_record(b, items[i], responses=[a]) for i, a in answers.items()]
    m = b.aggregate(recs)
    assert m["counts"]["IG"] == 1 and m["counts"]["CM_strict"] == 1
    assert m["score_strict"] == pytest.approx((2 - 0.5) / 2)
    assert m["rules"] == {"fallback:boxed": 1, "official": 6}
    fb = m["with_fallback"]
    assert fb["label"].startswith("NON-OFFICIAL")
    assert fb["counts"]["CM_strict"] == 2 and fb["score_strict"] == 1.0
    assert m["accuracy"] == pytest.approx(6 / 7) and fb["accuracy"] == 1.0
