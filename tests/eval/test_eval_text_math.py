"""Text math (AIME, HMMT, MATH-500) and AMO-Bench: prompts, boxed + math-verify scoring,
avg@k / pass@k / maj@k, the timeout path, and AMO-Bench's official extraction and P subset."""

from __future__ import annotations

import pytest

from opsd_mm.eval.benchmarks import amo_bench
from opsd_mm.eval.records import make_record
from opsd_mm.eval.registry import get_benchmark
from tests.fixtures.benchmarks import fixture_rows


def rows(name: str, **options) -> tuple[object, dict[str, dict]]:
    b = get_benchmark(name, **options)
    return b, {b.item_id(r): r for r in fixture_rows(name)}


def test_prompt_styles():
    b, r = rows("aime25")
    assert b.prompt(r["1"]).question == (
        "Find the sum of all positive integers $n$ with $n^2 < 30$.\n\n"
        "Please reason step by step, and put your final answer within \\boxed{}."
    )
    b, r = rows("aime25", prompt_style="matharena")
    assert b.prompt(r["1"]).question == (
        "Put your final answer within \\boxed{}.\nThe answer is an integer between 0 and 999 "
        "inclusive.\n\nFind the sum of all positive integers $n$ with $n^2 < 30$."
    )
    b, r = rows("hmmt25", prompt_style="matharena")
    assert b.prompt(r["1"]).question.startswith("Put your final answer within \\boxed{}.\n\n")
    with pytest.raises(ValueError, match="prompt_style"):
        get_benchmark("math500", prompt_style="chat")


@pytest.mark.parametrize(
    "name, iid, response, ok, rule",
    [
        ("aime24", "60", "So \\boxed{24}.", True, "boxed"),
        ("aime24", "60", "\\boxed{24} no wait \\boxed{25}", False, "boxed"),
        ("aime24", "60", "The answer is 24.", False, "no_boxed"),
        ("aime25", "1", "\\boxed{15}", True, "boxed"),  # integer answer column
        ("hmmt25", "1", "\\boxed{0.8}", True, "boxed"),  # \frac{4}{5} == 0.8
        ("hmmt25", "2", "\\boxed{\\frac{1}{4}\\sqrt{3}}", True, "boxed"),
        (
            "math500",
            "test/precalculus/3.json",
            "\\boxed{\\left(3,\\frac{\\pi}{2}\\right)}",
            True,
            "boxed",
        ),
        ("math500", "test/prealgebra/1.json", "\\boxed{\\frac{3}{4}}", True, "boxed"),
        ("math500", "test/algebra/2.json", "\\boxed{x = 2}", True, "boxed"),
    ],
)
def test_boxed_math_verify(name, iid, response, ok, rule):
    b, r = rows(name)
    s = b.score(r[iid], response)
    assert (s["correct"], s["rule"]) == (ok, rule)


def test_matharena_style_accepts_fbox():
    b, r = rows("aime24", prompt_style="matharena")
    assert b.score(r["60"], "\\fbox{24}")["correct"]
    assert not rows("aime24")[0].score(r["60"], "\\fbox{24}")["correct"]


def test_avg_pass_maj_and_categories():
    b, r = rows("hmmt25")
    recs = [
        make_record(b, r["1"], responses=["\\boxed{0.8}", "\\boxed{1}", "\\boxed{1}"]),
        make_record(b, r["3"], responses=["\\boxed{6}", "\\boxed{6}", "none"]),
    ]
    m = b.aggregate(recs)
    assert m["accuracy"] == m["avg@3"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert m["pass@3"] == 1.0
    assert m["maj@3"] == 0.5  # item 1: the majority answer 1 is wrong
    assert m["by_problem_type"]["Algebra"]["total"] == 2
    assert m["by_problem_type"]["Combinatorics"]["accuracy"] == pytest.approx(2 / 3)


def test_timeout_scores_zero_and_is_counted(monkeypatch):
    # The worker's real deadline is tested in test_eval_grading; here the scorer's handling.
    from opsd_mm.eval import grading

    monkeypatch.setattr(grading, "call_with_timeout", lambda fn, args, timeout: ("timeout", None))
    b, r = rows("math500")
    s = b.score(r["test/prealgebra/1.json"], "\\boxed{0.75}")
    assert s == {"correct": False, "extracted": "0.75", "rule": "timeout", "timed_out": True}
    m = b.aggregate([make_record(b, r["test/prealgebra/1.json"], responses=["\\boxed{0.75}"])])
    assert m["n_timeouts"] == 1 and m["accuracy"] == 0.0
    assert m["rules"] == {"timeout": 1}


# ----------------------------------------------------------------------------- AMO-Bench


@pytest.mark.parametrize(
    "response, kind, expected",
    [
        (
            "<think>\\boxed{7}</think>\nWork.\n### The final answer is: $\\boxed{101}$",
            "number",
            "$\\boxed{101}$",
        ),
        ("### The Final Answer is: $12$", "number", "$12$"),
        ("reasoning ### final answer: $1,000$", "number", "$1000$"),
        ("</think>Final answer: $\\left(1, 2\\right)$", "set", "$(1, 2)$"),
        ("</think>no marker, just $\\boxed{3}$", "number", "no marker just $\\boxed{3}$"),
        (
            "### The final answer is: All 1-periodic functions.",
            "description",
            "All 1-periodic functions.",
        ),
    ],
)
def test_amo_extraction(response, kind, expected):
    assert amo_bench.extract(response, kind) == expected


def test_amo_cut():
    assert amo_bench.cut("$5$\n---\nmore text") == "$5$"
    assert amo_bench.cut("$5$ \\medskip note") == "$5$"


def test_amo_scoring_and_p_subset():
    b, r = rows("amo_bench")
    ok = b.score(r["1"], "<think>103?</think>### The final answer is: $\\boxed{101}$")
    assert ok["correct"] and ok["rule"] == "parser" and ok["graded"]
    assert b.score(r["2"], "### The final answer is: $\\{2, -2\\}$")["correct"]
    assert b.score(r["5"], "### The final answer is: $y = \\frac{n^2+n}{2}$")["correct"]
    assert not b.score(r["5"], "### The final answer is: $y = n^2$")["correct"]
    desc = b.score(r["9"], "### The final answer is: periodic ones")
    assert desc["rule"] == "needs_judge" and desc["graded"] is False
    recs = [
        make_record(b, r["1"], responses=["### The final answer is: $101$"]),
        make_record(b, r["2"], responses=["### The final answer is: $\\{2\\}$"]),
        make_record(b, r["9"], responses=["### The final answer is: periodic ones"]),
    ]
    m = b.aggregate(recs)
    assert m["amo_bench_p"] == 0.5 and m["n_p"] == 2 and m["n_description"] == 1
    assert "accuracy" not in m and "AMO-Bench-P" in m["label"]
    assert set(m["by_answer_type"]) == {"number", "set"}


def test_amo_judge_hook():
    b, r = rows("amo_bench", judge=lambda question, gold, pred: "periodic" in pred)
    recs = [
        make_record(b, r["1"], responses=["### The final answer is: $101$"]),
        make_record(b, r["9"], responses=["### The final answer is: periodic ones"]),
    ]
    assert recs[1]["scores"][0]["rule"] == "judge"
    m = b.aggregate(recs)
    assert m["accuracy"] == 1.0 and m["amo_bench_p"] == 1.0
    assert "accuracy" in b.headline
