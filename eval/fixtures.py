"""Tiny offline copies of every benchmark, written from code (nothing binary is checked in).

``write_fixtures(root)`` writes, for each registered benchmark, a handful of rows in the hub
dataset's schema to ``root/<name>`` with ``datasets.Dataset.save_to_disk``, so that
``--data-dir root`` works exactly like a real local copy. Images are small generated PNGs. A few
rows are deliberately broken to exercise error paths: MMMU ``validation_Biology_5`` and
MathVista pid ``4`` reference an image that is missing (None).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import datasets
from PIL import Image, ImageDraw

from opsd_mm.eval.fixtures_text import _aime24, _amo_bench, _math500, _matharena

V = datasets.Value
IMG = datasets.Image()


def make_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A deterministic picture: a coloured background with a few shapes."""
    colours = [(230, 80, 80), (80, 160, 230), (90, 200, 120), (240, 200, 60), (160, 90, 220)]
    im = Image.new("RGB", size, colours[seed % len(colours)])
    draw = ImageDraw.Draw(im)
    for i in range(1 + seed % 3):
        x = 6 + 18 * i
        draw.ellipse([x, 10, x + 12, 22], fill=(255, 255, 255), outline=(0, 0, 0))
    draw.rectangle([4, 30, 4 + 8 * (1 + seed % 6), 40], fill=(0, 0, 0))
    return im


# ----------------------------------------------------------------------------- VL benchmarks


def _mmmu() -> tuple[datasets.Features, list[dict[str, Any]]]:
    feats = {
        "id": V("string"),
        "question": V("string"),
        "options": V("string"),
        "explanation": V("string"),
        **{f"image_{k}": IMG for k in range(1, 8)},
        "img_type": V("string"),
        "answer": V("string"),
        "topic_difficulty": V("string"),
        "question_type": V("string"),
        "subfield": V("string"),
    }

    def row(i: str, q: str, opts: str, ans: str, qtype: str, images: dict[int, Any]) -> dict:
        r = {
            "id": i,
            "question": q,
            "options": opts,
            "explanation": "",
            "img_type": "['Diagrams']",
            "answer": ans,
            "topic_difficulty": "Easy",
            "question_type": qtype,
            "subfield": "Fixture",
        }
        r.update({f"image_{k}": images.get(k) for k in range(1, 8)})
        return r

    rows = [
        row(
            "validation_Math_1",
            "<image 1> What is the area of the shaded region?",
            "['12', '14', '16', '18']",
            "B",
            "multiple-choice",
            {1: make_image(1)},
        ),
        row(
            "validation_Art_Theory_2",
            "Which picture shows the same style as <image 1>?",
            "['<image 2>', '<image 3>', 'Neither', 'Both']",
            "A",
            "multiple-choice",
            {1: make_image(2), 2: make_image(3), 3: make_image(4)},
        ),
        row(
            "validation_Physics_3",
            "<image 1> What is the current through the resistor, in amperes?",
            "[]",
            "12.97",
            "open",
            {1: make_image(5)},
        ),
        row(
            "validation_Economics_4",
            "<image 1> What fraction of the budget goes to rent?",
            "[]",
            "['0.5', '1/2']",
            "open",
            {1: make_image(6)},
        ),
        row(
            "validation_Biology_5",
            "<image 1> Which organelle is labelled X?",
            "['Nucleus', 'Ribosome', 'Mitochondrion', 'Golgi body']",
            "C",
            "multiple-choice",
            {},  # image_1 is referenced but missing
        ),
    ]
    return datasets.Features(feats), rows


def _mathvista() -> tuple[datasets.Features, list[dict[str, Any]]]:
    meta = datasets.Features(
        {
            "category": V("string"),
            "context": V("string"),
            "grade": V("string"),
            "img_height": V("int64"),
            "img_width": V("int64"),
            "language": V("string"),
            "skills": datasets.List(V("string")),
            "source": V("string"),
            "split": V("string"),
            "task": V("string"),
        }
    )
    feats = datasets.Features(
        {
            "pid": V("string"),
            "question": V("string"),
            "image": V("string"),
            "decoded_image": IMG,
            "choices": datasets.List(V("string")),
            "unit": V("string"),
            "precision": V("float64"),
            "answer": V("string"),
            "question_type": V("string"),
            "answer_type": V("string"),
            "metadata": meta,
            "query": V("string"),
        }
    )

    def md(task: str, skills: list[str]) -> dict[str, Any]:
        return {
            "category": "math-targeted-vqa",
            "context": "synthetic scene",
            "grade": "elementary school",
            "img_height": 48,
            "img_width": 64,
            "language": "english",
            "skills": skills,
            "source": "Fixture",
            "split": "testmini",
            "task": task,
        }

    int_hint = (
        "Hint: Please answer the question requiring an integer answer and provide the final "
        "value, e.g., 1, 2, 3, at the end.\n"
    )
    mc_hint = (
        "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, "
        "D, at the end.\n"
    )
    float_hint = (
        "Hint: Please answer the question requiring a floating-point number with one decimal "
        "place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.\n"
    )
    rows = [
        {
            "pid": "1",
            "question": "How many circles are in the image?",
            "image": "images/1.jpg",
            "decoded_image": make_image(2),
            "choices": None,
            "unit": None,
            "precision": None,
            "answer": "3",
            "question_type": "free_form",
            "answer_type": "integer",
            "metadata": md("figure question answering", ["arithmetic reasoning"]),
            "query": int_hint + "Question: How many circles are in the image?",
        },
        {
            "pid": "2",
            "question": "What is the length of side AB?",
            "image": "images/2.jpg",
            "decoded_image": make_image(3),
            "choices": ["3", "4", "5", "6"],
            "unit": None,
            "precision": None,
            "answer": "4",
            "question_type": "multi_choice",
            "answer_type": "text",
            "metadata": md(
                "geometry problem solving", ["geometry reasoning", "algebraic reasoning"]
            ),
            "query": mc_hint
            + "Question: What is the length of side AB?\nChoices:\n(A) 3\n(B) 4\n(C) 5\n(D) 6",
        },
        {
            "pid": "3",
            "question": "What is the height of the bar?",
            "image": "images/3.jpg",
            "decoded_image": make_image(4),
            "choices": None,
            "unit": None,
            "precision": 1.0,
            "answer": "2.5",
            "question_type": "free_form",
            "answer_type": "float",
            "metadata": md("figure question answering", ["statistical reasoning"]),
            "query": float_hint + "Question: What is the height of the bar?",
        },
        {
            "pid": "4",
            "question": "How many squares are there?",
            "image": "images/4.jpg",
            "decoded_image": None,  # missing image
            "choices": None,
            "unit": None,
            "precision": None,
            "answer": "2",
            "question_type": "free_form",
            "answer_type": "integer",
            "metadata": md("figure question answering", ["arithmetic reasoning"]),
            "query": int_hint + "Question: How many squares are there?",
        },
    ]
    return feats, rows


def _mathvision() -> tuple[datasets.Features, list[dict[str, Any]]]:
    feats = datasets.Features(
        {
            "id": V("string"),
            "question": V("string"),
            "options": datasets.List(V("string")),
            "image": V("string"),
            "decoded_image": IMG,
            "answer": V("string"),
            "solution": V("string"),
            "level": V("int64"),
            "subject": V("string"),
        }
    )

    def row(i: str, q: str, opts: list[str], ans: str, level: int, subject: str) -> dict:
        return {
            "id": i,
            "question": q,
            "options": opts,
            "image": f"images/{i}.jpg",
            "decoded_image": make_image(int(i)),
            "answer": ans,
            "solution": None,
            "level": level,
            "subject": subject,
        }

    rows = [
        row(
            "1",
            "<image1>\nHow many circles are there?",
            ["3", "4", "5", "6", "7"],
            "B",
            1,
            "counting",
        ),
        row(
            "2",
            "Which of the shapes in <image1> has the largest angle?",
            ["A", "B", "C", "D", "E"],
            "C",
            2,
            "metric geometry - angle",
        ),
        row(
            "3",
            "<image1>\nWhat fraction of the square is shaded?",
            [],
            "\\frac{1}{2}",
            3,
            "algebra",
        ),
        row("4", "<image1>\nHow long is the diagonal?", [], "2\\sqrt{3}", 4, "analytic geometry"),
    ]
    return feats, rows


def _wemath() -> tuple[datasets.Features, list[dict[str, Any]]]:
    feats = datasets.Features(
        {
            "ID": V("string"),
            "split": V("string"),
            "knowledge concept": V("string"),
            "question": V("string"),
            "option": V("string"),
            "answer": V("string"),
            "image_path": IMG,
            "key": V("string"),
            "question number": V("int64"),
            "knowledge concept description": V("string"),
        }
    )
    opt = "A. 2; B. 3; C. 4; D. 5; E. No correct answer"
    spec = [
        ("1", "2steps_1", "How many sides does the shape have?", "B"),
        ("1", "2steps_2", "How long is each side?", "A"),
        ("1", "2steps_multi", "What is the perimeter divided by 2?", "B"),
        ("2", "3steps_1", "How many rows are there?", "A"),
        ("2", "3steps_2", "How many columns are there?", "B"),
        ("2", "3steps_3", "How many cells are shaded?", "C"),
        ("2", "3steps_multi", "How many cells are not shaded?", "A"),
    ]
    rows = [
        {
            "ID": i,
            "split": "testmini",
            "knowledge concept": "Perimeter" if i == "1" else "Counting",
            "question": q,
            "option": opt,
            "answer": a,
            "image_path": make_image(n),
            "key": key,
            "question number": n,
            "knowledge concept description": "A fixture knowledge card.",
        }
        for n, (i, key, q, a) in enumerate(spec)
    ]
    return feats, rows


def _zerobench() -> tuple[datasets.Features, list[dict[str, Any]]]:
    feats = datasets.Features(
        {
            "question_id": V("string"),
            "question_text": V("string"),
            "question_images_decoded": datasets.List(IMG),
            "question_answer": V("string"),
            "question_images": datasets.List(V("string")),
            "image_attribution": V("string"),
        }
    )
    spec = [
        ("1", "Which city is shown in the picture?", "Paris", 1),
        ("2", "How much do I save with the loyalty card? Give your answer in dollars.", "11.90", 2),
        ("3", "Count the circles in both images.", "7", 2),
    ]
    rows = [
        {
            "question_id": i,
            "question_text": q,
            "question_images_decoded": [make_image(10 * int(i) + j) for j in range(n)],
            "question_answer": a,
            "question_images": [f"images/{i}_{j}.png" for j in range(n)],
            "image_attribution": "Own",
        }
        for i, q, a, n in spec
    ]
    return feats, rows


BUILDERS: dict[str, Callable[[], tuple[datasets.Features, list[dict[str, Any]]]]] = {
    "mmmu": _mmmu,
    "mathvista": _mathvista,
    "mathvision": _mathvision,
    "mathvision_mini": _mathvision,
    "wemath": _wemath,
    "zerobench": _zerobench,
    "zerobench_sub": _zerobench,
    "aime24": _aime24,
    "aime25": lambda: _matharena(True),
    "hmmt25": lambda: _matharena(False),
    "amo_bench": _amo_bench,
    "math500": _math500,
}


def fixture_rows(name: str) -> list[dict[str, Any]]:
    """The fixture rows of benchmark ``name`` (images as PIL objects)."""
    return BUILDERS[name]()[1]


def write_fixtures(root: str | Path, names: Iterable[str] | None = None) -> dict[str, Path]:
    """Write ``root/<name>`` for each benchmark (all by default); returns the paths."""
    root = Path(root)
    out = {}
    for name in names or BUILDERS:
        feats, rows = BUILDERS[name]()
        path = root / name
        ordered = [{k: r[k] for k in feats} for r in rows]  # columns in the hub's order
        datasets.Dataset.from_list(ordered, features=feats).save_to_disk(str(path))
        out[name] = path
    return out
