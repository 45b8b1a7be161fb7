"""Fixture rows for the text-math benchmarks (AIME 2024/2025, HMMT Feb 2025, AMO-Bench,
MATH-500), in each hub dataset's schema; ``opsd_mm.eval.fixtures`` writes them to disk."""

from __future__ import annotations

from typing import Any

import datasets

V = datasets.Value


def _aime24() -> tuple[datasets.Features, list[dict[str, Any]]]:
    feats = datasets.Features(
        {
            "id": V("int64"),
            "problem": V("string"),
            "solution": V("string"),
            "answer": V("string"),
            "url": V("string"),
            "year": V("string"),
        }
    )
    spec = [
        (60, "Find the remainder when $2^{10}$ is divided by $1000$.", "24"),
        (61, "How many positive divisors does $360$ have?", "24"),
        (62, "Compute $\\binom{10}{3}$.", "120"),
    ]
    rows = [
        {"id": i, "problem": p, "solution": "", "answer": a, "url": "", "year": "2024"}
        for i, p, a in spec
    ]
    return feats, rows


def _matharena(answers_as_int: bool) -> tuple[datasets.Features, list[dict[str, Any]]]:
    feats = datasets.Features(
        {
            "problem_idx": V("int64"),
            "problem": V("string"),
            "answer": V("int64") if answers_as_int else V("string"),
            "problem_type": datasets.List(V("string")),
        }
    )
    if answers_as_int:
        spec = [
            (1, "Find the sum of all positive integers $n$ with $n^2 < 30$.", 15, ["Algebra"]),
            (2, "How many subsets of $\\{1,2,3,4\\}$ are nonempty?", 15, ["Combinatorics"]),
            (3, "Find $7 \\cdot 11 \\cdot 13 \\bmod 1000$.", 1, ["Number Theory"]),
        ]
    else:
        spec = [
            (1, "Compute $\\sum_{k=1}^{4} \\frac{1}{k(k+1)}$.", "\\frac{4}{5}", ["Algebra"]),
            (
                2,
                "Compute the area of a unit equilateral triangle.",
                "\\frac{\\sqrt{3}}{4}",
                ["Geometry"],
            ),
            (3, "How many ways can 3 people sit in a row?", "6", ["Combinatorics", "Algebra"]),
        ]
    rows = [{"problem_idx": i, "problem": p, "answer": a, "problem_type": t} for i, p, a, t in spec]
    return feats, rows


def _amo_bench() -> tuple[datasets.Features, list[dict[str, Any]]]:
    feats = datasets.Features(
        {
            "question_id": V("int64"),
            "prompt": V("string"),
            "solution": V("string"),
            "answer": V("string"),
            "answer_type": V("string"),
        }
    )
    fmt = (
        "\n\nAfter solving the above problem, please output your final answer in the following "
        "format:\n### The final answer is: $\\boxed{<your answer>}$"
    )
    spec = [
        (1, "Find the smallest prime greater than $100$.", "$101$", "number"),
        (2, "Find all real $x$ with $x^2 = 4$.", "$\\{-2, 2\\}$", "set"),
        (
            5,
            "Let $y$ be the sum of the first $n$ positive integers. Express $y$ in $n$.",
            "$y=\\frac{n(n+1)}{2}$",
            "variable",
        ),
        (
            9,
            "Describe all functions $f$ with $f(x+1) = f(x)$.",
            "All 1-periodic functions.",
            "description",
        ),
    ]
    rows = [
        {"question_id": i, "prompt": p + fmt, "solution": "", "answer": a, "answer_type": t}
        for i, p, a, t in spec
    ]
    return feats, rows


def _math500() -> tuple[datasets.Features, list[dict[str, Any]]]:
    feats = datasets.Features(
        {
            "problem": V("string"),
            "solution": V("string"),
            "answer": V("string"),
            "subject": V("string"),
            "level": V("int64"),
            "unique_id": V("string"),
        }
    )
    spec = [
        (
            "What is $\\frac{1}{2} + \\frac{1}{4}$?",
            "\\frac{3}{4}",
            "Prealgebra",
            1,
            "test/prealgebra/1.json",
        ),
        ("Solve $2x + 3 = 7$ for $x$.", "2", "Algebra", 2, "test/algebra/2.json"),
        (
            "Convert $(0, 3)$ to polar coordinates.",
            "\\left( 3, \\frac{\\pi}{2} \\right)",
            "Precalculus",
            3,
            "test/precalculus/3.json",
        ),
    ]
    rows = [
        {"problem": p, "solution": "", "answer": a, "subject": s, "level": lv, "unique_id": u}
        for p, a, s, lv, u in spec
    ]
    return feats, rows
