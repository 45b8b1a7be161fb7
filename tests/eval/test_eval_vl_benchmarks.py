"""MMMU, ZeroBench, MathVision and MathVista: prompts, official scoring, aggregation."""

from __future__ import annotations

import pytest

from opsd_mm.eval.benchmarks._common import ItemError
from opsd_mm.eval.benchmarks.mathvista import levenshtein
from opsd_mm.eval.registry import get_benchmark
from tests.fixtures.benchmarks import fixture_rows


def rows(name: str) -> dict[str, dict]:
    b = get_benchmark(name)
    return {b.item_id(r): r for r in fixture_rows(name)}


def record(bench, item, responses):
    from opsd_mm.eval.records import make_record

    return make_record(bench, item, responses=responses)


# ----------------------------------------------------------------------------- MMMU


def test_mmmu_prompts_and_images():
    b, r = get_benchmark("mmmu"), rows("mmmu")
    ex = b.prompt(r["validation_Math_1"])
    assert ex.question == (
        "<image 1> What is the area of the shaded region?\n(A) 12\n(B) 14\n(C) 16\n(D) 18\n\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert len(ex.images) == 1
    assert len(b.prompt(r["validation_Art_Theory_2"]).images) == 3  # option images count
    assert b.prompt(r["validation_Physics_3"]).question == (
        "<image 1> What is the current through the resistor, in amperes?\n"
        "Answer the question using a single word or phrase."
    )
    with pytest.raises(ItemError, match="validation_Biology_5.*image_1"):
        b.prompt(r["validation_Biology_5"])


def test_mmmu_scoring():
    b, r = get_benchmark("mmmu"), rows("mmmu")
    s = b.score(r["validation_Physics_3"], "The answer is 12.97")
    assert s["correct"] and s["rule"] == "open"
    s = b.score(r["validation_Math_1"], "(A) is wrong; (B) is right")
    assert (s["extracted"], s["rule"], s["correct"]) == ("B", "bracket", True)
    s1 = b.score(r["validation_Math_1"], "hmm")
    assert s1["rule"] == "random" and s1 == b.score(r["validation_Math_1"], "hmm")
    assert b.score(r["validation_Economics_4"], "so it is 0.5")["correct"]


def test_mmmu_aggregate_by_subject_and_domain():
    b, r = get_benchmark("mmmu"), rows("mmmu")
    recs = [
        record(b, r["validation_Math_1"], ["(B)"]),
        record(b, r["validation_Art_Theory_2"], ["(C)"]),
        record(b, r["validation_Physics_3"], ["The answer is 12.97"]),
    ]
    m = b.aggregate(recs)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["by_subject"]["Art_Theory"]["accuracy"] == 0.0
    assert m["by_domain"]["Science"] == {"accuracy": 1.0, "correct": 2.0, "total": 2}
    assert m["by_question_type"]["open"]["accuracy"] == 1.0


# ----------------------------------------------------------------------------- ZeroBench


def test_zerobench_prompt():
    b, r = get_benchmark("zerobench"), rows("zerobench")
    ex = b.prompt(r["2"])
    assert ex.question.endswith(
        "dollars.\n\n\nLet's think step by step and give the final answer in curly braces, "
        "like this: {final answer}"
    )
    assert len(ex.images) == 2


@pytest.mark.parametrize(
    "response, ok",
    [
        ("so the final answer is {paris}", True),
        ("so the final answer is { Paris }", False),  # the parsed text is not stripped
        ("{PARIS}", True),
        ("  {london} then {paris}  ", True),  # last match
        ("{paris} then {london}", False),
        ("{pa\nris}", False),  # no newlines inside braces
        ("\\boxed{paris}", True),  # the inner part of a \boxed{} is a match too
        ("paris", False),
    ],
)
def test_zerobench_official_check(response, ok):
    b, r = get_benchmark("zerobench"), rows("zerobench")
    assert b.score(r["1"], response)["correct"] is ok


def test_zerobench_pass5_and_reliability():
    b, r = get_benchmark("zerobench"), rows("zerobench")
    recs = [
        record(b, r["1"], ["{paris}"] * 5),
        record(b, r["2"], ["{11.90}", "{12}", "{11.90}", "{}", "x"]),
        record(b, r["3"], ["{8}"] * 5),
    ]
    m = b.aggregate(recs)
    assert m["samples"] == 5
    assert m["pass@5"] == pytest.approx(2 / 3)
    assert m["5/5"] == pytest.approx(1 / 3)
    assert m["avg@5"] == pytest.approx(7 / 15)
    one = b.aggregate([record(b, r["1"], ["{paris}"]), record(b, r["3"], ["{8}"])])
    assert one["pass@1"] == 0.5 and "pass@5" not in one
    assert b.default_sampling(5) == {"temperature": 0.7, "top_p": 0.95}


# ----------------------------------------------------------------------------- MathVision


def test_mathvision_prompt_hides_letter_only_options():
    b, r = get_benchmark("mathvision"), rows("mathvision")
    head = (
        'Please solve the problem step by step and put your answer in one "\\boxed{}". If it is '
        'a multiple choice question, only one letter is allowed in the "\\boxed{}".\n'
    )
    assert b.prompt(r["1"]).question == (
        head + "<image1>\nHow many circles are there?\n(A) 3\n(B) 4\n(C) 5\n(D) 6\n(E) 7\n"
    )
    q2 = b.prompt(r["2"]).question
    assert q2 == head + "Which of the shapes in <image1> has the largest angle?\n"
    assert "(A)" not in q2
    assert b.prompt(r["3"]).question.endswith("shaded?\n")


def test_mathvision_scoring_and_aggregate():
    b, r = get_benchmark("mathvision"), rows("mathvision")
    assert b.score(r["1"], "\\boxed{B}")["correct"]
    assert b.score(r["1"], "four circles, so \\boxed{4}")["correct"]  # option text
    assert not b.score(r["1"], "\\boxed{C}")["correct"]
    assert b.score(r["3"], "\\boxed{0.5}")["correct"]
    s = b.score(r["4"], "The diagonal is \\boxed{3.46}")
    assert s["correct"] and s["rule"] == "boxed" and not s["timed_out"]
    recs = [record(b, r[i], [x]) for i, x in (("1", "\\boxed{B}"), ("3", "\\boxed{1}"))]
    m = b.aggregate(recs)
    assert m["accuracy"] == 0.5
    assert m["by_level"]["1"]["accuracy"] == 1.0 and m["by_subject"]["algebra"]["accuracy"] == 0


# ----------------------------------------------------------------------------- MathVista


@pytest.mark.parametrize(
    "pid, response, rule, ok",
    [
        ("1", "3", "official:integer", True),
        ("1", 'The answer is "3".', "official:quick", True),
        ("1", "I count three... final count \\boxed{3}", "rule:boxed", True),
        ("1", "There are 2 big and 1 small, 3 in total", "rule:last_number", True),
        ("2", "4", "official:choice", True),
        ("2", "By Pythagoras the answer is (B).", "rule:answer_phrase", True),
        ("2", "(C)", "rule:letter", False),
        ("3", "2.5", "official:float", True),
        ("3", "Answer: 2.46", "rule:answer_phrase", True),  # rounded to precision 1
        ("3", "\\boxed{2.6}", "rule:boxed", False),
    ],
)
def test_mathvista_rules(pid, response, rule, ok):
    b, r = get_benchmark("mathvista"), rows("mathvista")
    s = b.score(r[pid], response)
    assert (s["rule"], s["correct"]) == (rule, ok)
    assert s["official_rule"] is rule.startswith("official")


def test_mathvista_choice_normalisation_nearest_option():
    from opsd_mm.eval.benchmarks.mathvista import normalize

    item = {"question_type": "multi_choice", "answer_type": "text", "choices": ["apple", "banana"]}
    assert normalize("(B) banana", item) == "banana"
    assert normalize("A", item) == "apple"
    assert normalize("banan", item) == "banana"  # smallest edit distance


def test_mathvista_is_labelled_non_official_and_has_a_judge_hook():
    b, r = get_benchmark("mathvista"), rows("mathvista")
    m = b.aggregate([record(b, r["1"], ["3"]), record(b, r["2"], ["(B)"])])
    assert m["label"].startswith("NON-OFFICIAL") and "NON-OFFICIAL" in b.label
    assert m["accuracy"] == 1.0 and m["n_samples_by_official_rules"] == 1
    assert m["by_skills"]["geometry reasoning"]["total"] == 1
    judged = get_benchmark("mathvista", extractor=lambda query, response: "B")
    s = judged.score(r["2"], "long rambling text")
    assert (s["rule"], s["correct"]) == ("llm_extractor", True)
    assert "NON-OFFICIAL" not in judged.label


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
