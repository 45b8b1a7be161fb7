"""The linear graders against the ones they replaced (bench/grading_legacy.py), the MMMU
empty-tail rule, rapidfuzz against the official ``Levenshtein`` package, and a hang guard on the
hostile answers of bench/grading.py.

Parity is checked three ways: random strings over the characters each parser reacts to (a
fixed seed; tens of thousands per parser, so every branch of the old code is hit), every fixture
item with the canned and extra responses below (the whole ``score`` with the old parsers put
back, verdicts and extractions equal), and the adversarial cases listed with where they come
from. No test times anything: the hang guard gives each hostile answer 60 s in the grading
worker, where the old code needs minutes at this size.
"""

from __future__ import annotations

import json
import random

import pytest

from bench import grading_legacy as old
from bench.grading import cases, old_parsers
from opsd_mm.eval import grading
from opsd_mm.eval.benchmarks import _mathvision_rules, amo_bench, mathvista, mmmu, zerobench
from opsd_mm.eval.registry import get_benchmark, list_benchmarks
from tests.eval.conftest import CANNED
from tests.fixtures.benchmarks import fixture_rows


def fuzz(alphabet: list[str], n: int, seed: int, longest: int = 14) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest))) for _ in range(n)]


# ----------------------------------------------------------------------------- random strings


def test_last_boxed_matches_the_old_scan():
    alphabet = ["\\boxed{", "\\boxed {", "\\fbox{", "{", "}", "\\{", "\\}", "\\", "a", "é", " "]
    for text in fuzz(alphabet, 30_000, seed=1):
        for commands in (("boxed",), ("boxed", "fbox")):
            assert grading.last_boxed(text, commands) == old.last_boxed(text, commands), text


def test_zerobench_curly_matches_the_official_regex():
    for text in fuzz(["{", "}", "\n", "\r", "a", " ", "B", "{}"], 30_000, seed=2):
        assert zerobench.parse_curly(text) == old.zerobench_parse_curly(text), text


def test_mmmu_numbers_match_the_official_patterns():
    alphabet = [*"0123456789", ".", ",", "e", "E", "+", "-", " ", "a", "_", "\n", "1,000", "2.5e3"]
    for text in fuzz(alphabet, 30_000, seed=3, longest=16):
        assert mmmu.mmmu_extract_numbers(text) == old.mmmu_extract_numbers(text), text


def test_mmmu_open_differs_from_the_old_parser_only_on_empty_tails():
    """The old parser kept an empty tail as the shortest; otherwise the two agree."""
    alphabet = ["is ", "so ", "answer ", "final ", "= ", "12", "3.5", "x", "\n", ". A", ".", " "]
    differ = 0
    for text in fuzz(alphabet, 20_000, seed=4):
        new, ref = mmmu.mmmu_parse_open(text), old.mmmu_parse_open(text)
        if new != ref:
            differ += 1
            pieces = text.strip().strip(".").lower().split("\n")
            assert any(
                p.rstrip().endswith(tuple(i.strip() for i in mmmu._MMMU_INDICATORS + ("=",)))
                for p in pieces
            ), text
    assert differ > 0  # the fuzz does reach the rule


def test_mathvision_box_mathvista_quick_and_amo_cleanup_match_the_old_code():
    for text in fuzz(["oxed{", "}", "{", "a", "\n", "{}", "o", "xed{"], 20_000, seed=5):
        assert _mathvision_rules._greedy_boxed(text) == old.mathvision_boxed(text), text
    quick = ['The answer is "', '".', '"', ".", "\n", "x", "The answer is "]
    for text in fuzz(quick, 20_000, seed=6):
        assert mathvista._quick(text) == old.mathvista_quick(text), text
    for text in fuzz([" ", ".", "}", "a", " }", ".}"], 20_000, seed=7):
        assert amo_bench.strip_before_brace(text) == old.amo_strip_before_brace(text), text


# ----------------------------------------------------------------------------- whole scorers

EXTRA_RESPONSES = [
    "",
    "\\boxed{24}",
    "\\boxed{\\frac{3}{4}} and then \\boxed{",
    "The answer is (B). Final: {paris}",
    "<Answer>: <<B>> \\boxed{A}",
    "so it is 12.97\nthe answer is \nParis",
    'The answer is "4".',
    "1,234.5 and 3e-3 and .5",
    "### The final answer is: $\\{2, -2\\}$",
    "### The final answer is: all periodic functions",
]


def test_every_scorer_gives_the_old_verdicts_on_the_fixtures():
    """Every registered benchmark, every fixture item, the canned and extra responses: the
    whole score dict equals the one the old parsers give (the MMMU empty-tail case excepted,
    where the new verdict is the official one and is checked below)."""
    compared = 0
    for name in list_benchmarks():
        bench = get_benchmark(name)
        for row in fixture_rows(name):
            iid = bench.item_id(row)
            responses = [CANNED[k] for k in CANNED if k[1] == iid] + EXTRA_RESPONSES
            for response in responses:
                new = bench.score(dict(row), response)
                with old_parsers():
                    ref = bench.score(dict(row), response)
                if name == "mmmu" and "is \nParis" in response:
                    continue
                assert json.dumps(new, sort_keys=True) == json.dumps(ref, sort_keys=True), (
                    name,
                    iid,
                    response,
                )
                compared += 1
    assert compared > 400


# ----------------------------------------------------------------------------- official cases
# MMMU's open parser (MMMU-Benchmark/MMMU, mmmu/utils/eval_utils.py, parse_open_response at
# bb0b95a945998d91dfef37e969e07d49d1139438): ``if not shortest_key_response`` treats an empty
# tail as unset, so the next indicator in the line replaces it. The expected keys are what that
# code returns (checked by running it on these and on 30,000 random strings of indicators,
# numbers and newlines, all equal); the old parser returned the whole response instead.
MMMU_EMPTY_TAILS = [
    ("the answer is \nParis", "Paris", ["is"], False),
    ("the final answer is ", "answer", ["is"], False),  # is -> "", final -> "answer is", "is"
    ("so \n42", "42", ["so \n42", 42.0], True),  # an empty tail alone: no key in that line
    ("it is \nthe result is 42", "42", [42.0], True),
]


@pytest.mark.parametrize("response, gold, keys, ok", MMMU_EMPTY_TAILS)
def test_mmmu_empty_tail_as_the_official_parser(response, gold, keys, ok):
    got = mmmu.mmmu_parse_open(response)
    assert sorted(map(str, got)) == sorted(map(str, keys))
    assert mmmu.mmmu_open_correct(mmmu.mmmu_gold_list(gold), got) is ok


# MathVista's nearest option (lupantech/MathVista, evaluation/calculate_score.py,
# get_most_similar with Levenshtein.distance): the choices of the official few-shot example
# (evaluation/prompts/ext_ans.py) and of the fixture, against free-text extractions.
OFFICIAL_CHOICES = [["3/11", "8/11", "6/11", "3/5"], ["3", "4", "5", "6"], ["apple", "banana"]]
EXTRACTIONS = ["8/11", "(B) 8/11", "The answer is 8/11.", "banan", "", "kitten", "é" * 5, "6/1"]


def test_rapidfuzz_distance_equals_the_official_levenshtein_package():
    official = pytest.importorskip("Levenshtein")
    for choices in OFFICIAL_CHOICES:
        for text in EXTRACTIONS + ["x" * 3000]:
            for c in choices:
                assert mathvista.levenshtein(text, c) == official.distance(text, c)
                assert mathvista.levenshtein(text, c) == old.levenshtein(text, c)
    for a, b in zip(fuzz(list("abcé "), 500, seed=8), fuzz(list("abé"), 500, seed=9)):
        assert mathvista.levenshtein(a, b) == official.distance(a, b) == old.levenshtein(a, b)


# ----------------------------------------------------------------------------- the guard


@pytest.mark.parametrize(
    "expr, beyond",
    [
        ("9^{9^{9^9}}", True),
        ("10^{10^{100}}", True),
        ("10^{-10^{100}}", True),
        ("3^{10^6}", True),  # 477,122 digits
        ("2^{(2^{30})}", True),
        ("2**2**64", True),
        ("1" * 4301, True),
        ("1" * 4300, False),
        ("2^{100000}", False),  # 30,103 digits: math-verify compares it in well under a second
        ("2^{2025}", False),
        ("x^{10^{100}}", False),  # symbolic base: nothing to evaluate
        ("1^{10^{100}}", False),
        ("\\frac{1}{2}", False),
        ("{" * 13 + "1" + "}" * 13, True),  # math-verify: 14 levels run past 20 s
        ("}}}}" + "{" * 13, True),  # unclosed ones count, stray closers do not
        ("\\frac{\\sqrt{\\frac{1}{2}}}{3}" + "{}" * 20, False),  # many braces, shallow
        ("{" * 12 + "1" + "}" * 12, False),
    ],
)
def test_beyond_symbolic(expr, beyond):
    assert grading.beyond_symbolic(expr) is beyond


def test_guard_grades_towers_by_string_and_says_so():
    v = grading.math_equal("9^{9^{9^{9}}}", "9^{ 9^{9^9}}")
    assert v == grading.Verdict(True, graded_by_guard=True)
    v = grading.math_equal("24", "10^{10^{100}}")
    assert v == grading.Verdict(False, graded_by_guard=True)
    assert grading.math_equal("\\frac{1}{2}", "0.5") == grading.Verdict(True)  # not guarded
    b = get_benchmark("aime24")
    row = next(r for r in fixture_rows("aime24") if b.item_id(r) == "60")
    s = b.score(row, "so \\boxed{9^{9^{9^9}}}")
    assert s["graded_by_guard"] and not s["timed_out"] and not s["correct"]
    from opsd_mm.eval.records import make_record

    m = b.aggregate([make_record(b, row, responses=["\\boxed{9^{9^{9^9}}}", "\\boxed{24}"])])
    assert m["n_graded_by_guard"] == 1 and m["n_timeouts"] == 0


def test_guard_in_amo_bench_mathvision_and_the_reward():
    from opsd_mm.eval.rewards import MathVerifyReward
    from opsd_mm.loss.rewards import group_advantages, reward_metrics
    from opsd_mm.types import Example

    amo = get_benchmark("amo_bench")
    row = dict(next(r for r in fixture_rows("amo_bench") if r["question_id"] == 1))
    s = amo.score(row, "### The final answer is: $\\boxed{10^{10^{100}}}$")
    assert s["graded_by_guard"] and s["rule"] == "parser" and not s["correct"]
    row["answer"] = "$10^{10^{100}}$"
    assert amo.score(row, "### The final answer is: $\\boxed{10^{10^{100}}}$")["correct"]
    mv = get_benchmark("mathvision")
    row = next(r for r in fixture_rows("mathvision") if r["id"] == "3")
    s = mv.score(row, "\\boxed{9^{9^{9^9}}}")
    assert s["graded_by_guard"] and not s["timed_out"] and not s["correct"]

    import torch

    scores = MathVerifyReward()(
        [Example(id="a", question="q", answer="24")] * 2, ["\\boxed{9^{9^{9^9}}}", "\\boxed{24}"]
    )
    assert [(s.value, s.graded_by_guard, s.failure) for s in scores] == [
        (0.0, True, None),
        (1.0, False, None),
    ]
    r_PG = torch.tensor([[s.value for s in scores]])
    metrics = reward_metrics(r_PG, group_advantages(r_PG)[1], scores)
    assert metrics["reward/graded_by_guard"] == 1 and metrics["reward/failed_timeout"] == 0


# ----------------------------------------------------------------------------- hang guard


def _score_every_case(size: int) -> None:
    """Every scorer of bench/grading.py on every hostile answer, each in the grading worker
    with a generous 60 s: a hang guard, not a timing."""
    from bench.grading import time_one

    names = ["mmmu_choice", "mmmu_open", "mathvista_choice", "mathvista_integer", "mathvision"]
    names += ["wemath", "zerobench", "aime24", "amo_bench", "reward_math", "reward_choice"]
    for case in cases(size):
        for scorer in names:
            status, value = grading.call_with_timeout(
                time_one, ("new", scorer, case, size), timeout=60
            )
            assert status == "ok", (scorer, case, status, value)
            if "tower" in case and scorer in ("aime24", "amo_bench", "reward_math", "mathvision"):
                assert value["guard"], (scorer, case)  # never handed to math-verify


def test_hostile_answers_never_hang_200k():
    _score_every_case(200_000)


@pytest.mark.slow
def test_hostile_answers_never_hang_2mb():
    _score_every_case(2_000_000)
