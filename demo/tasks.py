"""The demo's two synthetic tasks, built so that a tiny model can show OPSD working in minutes.

What OPSD can transfer: the student improves where the teacher context (question + privileged
text) puts high probability on better tokens *on the student's own rollouts*. With a tiny model
the teacher is a literal reader of its privileged text, which decides the design:

- A privileged text that spells out every intermediate result makes the tiny teacher a *copier*:
  after the student's first arithmetic slip (``3 - 5 = 4.``) the teacher keeps predicting the
  trace's numbers (``-2``), i.e. it teaches the student to break its own chain. We measured
  this: with full worked traces, OPSD left held-out accuracy flat (12% -> 10%) while corrupting
  arithmetic. So each task's privileged text carries the missing *knowledge* and leaves the
  computation to the model, whose teacher then agrees with any self-consistent rollout.
- The warm start (``opsd_mm.demo.sft``) learns a skill in one phrasing from the student context, and
  the target phrasing only in the teacher context. From the question alone it cannot map the new
  phrasing onto its skill (near chance); with the privileged text it can (near 100%). OPSD must
  move that mapping into the weights; held-out items are never seen in any phrasing.

Tasks:

- ``text`` - two-step arithmetic in words (``What is 3 plus 5 minus 2?``). Known skill: the same
  sums in symbols (``Compute 3 + 5 - 2.``), solved as a worked chain ``3 + 5 = 8. 8 - 2 = 6.
  \\boxed{6}``. Privileged text: the expression in symbols (``In symbols: 3 + 5 - 2.``).
  Expressions are partitioned into train / validation / test, so test sums are unseen in words
  *and* in symbols.
- ``vision`` - count the cells of one colour in a generated 3 x 3 grid image (28 px cells, one
  merged vision token per cell for Qwen-VL's 14 px patches). Known skill: ``How many red cells
  are in this grid?``. Target phrasing: colours named by a fixed letter code (``How many D cells
  are in this grid?``) that only the privileged trace decodes: it names the colour and lists the
  matching cells, then the count. Completions are ``Counting green cells: \\boxed{2}``; test
  images are fresh draws. Naming the colour is an empirical choice: at equal settings (forward
  KL, lr 3e-3, 100 steps, one warm start) OPSD gained +9 to +27 points over 3 seeds with
  answer-only completions (some seeds stuck at the majority count) and +27 to +51 with it. The
  named colour itself stays mostly wrong after OPSD while the count becomes right, so why it
  helps is not understood.
- ``vision_view`` - the vision task with the privilege in the pixels instead of the text: no
  privileged text at all (the teacher's message is the question, ``question_only_v1``); the
  teacher's copy of the grid has the cells of the coded colour outlined (``processor.
  teacher_view: mark``, on the cells the example's regions name). Which colour ``D`` is shows
  only in the teacher's pixels; OPSD must move it into the student, who sees the plain grid.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from opsd_mm.types import Example

WORDS = {"+": "plus", "-": "minus"}
N_VAL, N_TEST = 60, 150  # validation and held-out test items of both tasks
COLOUR_CODES = {"red": "C", "green": "D", "blue": "E", "yellow": "H"}  # single tokens in tiny BPE


@dataclass
class TaskData:
    """Everything one demo task needs. ``solution(ex)`` is the reference completion: the SFT
    target of the warm start and of the SFT baseline."""

    name: str
    train: list[Example]  # target phrasing: OPSD prompts, SFT-baseline data
    val: list[Example]  # target phrasing: accuracy curves during training
    test: list[Example]  # target phrasing, held out: before/after accuracy
    warm_student: list[Example]  # known phrasing, trained in the student context
    warm_teacher: list[Example]  # target phrasing, trained in the teacher context
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)


def solution(ex: Example) -> str:
    return ex.meta["solution"]


# ----------------------------------------------------------------------------- text


def _chain(terms: tuple[int, ...], ops: tuple[str, ...]) -> tuple[str, int]:
    """The worked chain ``a + b = r1. r1 - c = r2. \\boxed{r2}`` and its value."""
    value, lines = terms[0], []
    for op, b in zip(ops, terms[1:]):
        new = value + b if op == "+" else value - b
        lines.append(f"{value} {op} {b} = {new}.")
        value = new
    return " ".join(lines) + f" \\boxed{{{value}}}", value


def _arith_example(terms: tuple[int, ...], ops: tuple[str, ...], form: str, idx: str) -> Example:
    symbols = " ".join([str(terms[0])] + [f"{op} {b}" for op, b in zip(ops, terms[1:])])
    words = " ".join([str(terms[0])] + [f"{WORDS[op]} {b}" for op, b in zip(ops, terms[1:])])
    chain, value = _chain(terms, ops)
    question = f"Compute {symbols}." if form == "symbols" else f"What is {words}?"
    return Example(
        id=f"text-{form}-{idx}",
        question=question,
        privileged=f"In symbols: {symbols}.",
        answer=str(value),
        meta={"solution": chain, "task": "text", "form": form},
    )


def make_text_task(
    seed: int = 0,
    max_operand: int = 5,
    steps: int = 2,
    n_val: int = N_VAL,
    n_test: int = N_TEST,
    n_warm: int = 1500,
) -> TaskData:
    """Word arithmetic. Every distinct expression (``max_operand`` x (2 x ``max_operand``) **
    ``steps``; 500 for the defaults) lands in exactly one of test, validation and train, so a
    test question is unseen in either phrasing. Warm-start and OPSD items are drawn from train."""
    import itertools

    rng = random.Random(f"demo-text-{seed}")
    operands = range(1, max_operand + 1)
    exprs = [
        (terms, ops)
        for terms in itertools.product(operands, repeat=steps + 1)
        for ops in itertools.product("+-", repeat=steps)
    ]
    rng.shuffle(exprs)
    if n_val + n_test >= len(exprs):
        raise ValueError(
            f"text task: {len(exprs)} expressions cannot hold {n_val + n_test} held out"
        )
    test, val, train = exprs[:n_test], exprs[n_test : n_test + n_val], exprs[n_test + n_val :]

    def build(pairs: list, form: str, tag: str) -> list[Example]:
        return [_arith_example(t, o, form, f"{tag}{i}") for i, (t, o) in enumerate(pairs)]

    def draw(n: int) -> list:
        return [train[rng.randrange(len(train))] for _ in range(n)]

    return TaskData(
        name="text",
        train=build(train, "words", "train"),
        val=build(val, "words", "val"),
        test=build(test, "words", "test"),
        warm_student=build(draw(n_warm), "symbols", "warm"),
        warm_teacher=build(draw(n_warm), "words", "warm"),
        max_new_tokens=28,
        meta={"expressions": len(exprs), "train_expressions": len(train)},
    )


# ----------------------------------------------------------------------------- vision


def _grid_example(
    rng: random.Random, form: str, idx: str, size: int, fill: float, task: str = "vision"
) -> Example:
    """One grid. ``task="vision_view"``: no privileged text; the target cells as regions (the
    teacher's view marks them)."""
    from opsd_mm.data.vl_tasks import cell_regions, draw_grid

    colours = list(COLOUR_CODES)
    cells = {
        (r, c): rng.choice(colours) for r in range(size) for c in range(size) if rng.random() < fill
    }
    target = rng.choice(colours)
    hits = sorted(rc for rc, colour in cells.items() if colour == target)
    listed = ", ".join(f"(row {r + 1}, column {c + 1})" for r, c in hits) or "none"
    code = COLOUR_CODES[target]
    name = target if form == "named" else code
    trace = (
        f"Colour code {code} is {target}. The {target} cells are at: {listed}. "
        f"That is {len(hits)}, so the answer is \\boxed{{{len(hits)}}}."
    )
    return Example(
        id=f"{task}-{form}-{idx}",
        question=f"<image>\nHow many {name} cells are in this grid?",
        privileged=trace if task == "vision" else "",
        answer=str(len(hits)),
        images=(draw_grid(cells, size, size, 28),),
        meta={
            "solution": f"Counting {target} cells: \\boxed{{{len(hits)}}}",
            "task": task,
            "form": form,
        },
        regions=cell_regions(hits, 28) if task == "vision_view" else (),
    )


def make_vision_task(
    seed: int = 0,
    size: int = 3,
    fill: float = 0.75,
    n_train: int = 1000,
    n_val: int = N_VAL,
    n_test: int = N_TEST,
    n_warm: int = 1200,
    task: str = "vision",
) -> TaskData:
    """Grid counting with colour codes; each split draws its own images from its own stream.
    ``task="vision_view"``: the same grids (the same draws), privileged by the teacher's view."""

    def draw(n: int, form: str, split: str) -> list[Example]:
        rng = random.Random(f"demo-vision-{seed}-{split}")
        return [_grid_example(rng, form, f"{split}{i}", size, fill, task) for i in range(n)]

    return TaskData(
        name=task,
        train=draw(n_train, "code", "train"),
        val=draw(n_val, "code", "val"),
        test=draw(n_test, "code", "test"),
        warm_student=draw(n_warm, "named", "warm-student"),
        warm_teacher=draw(n_warm, "code", "warm-teacher"),
        max_new_tokens=16,
        meta={"grid": f"{size}x{size}", "codes": dict(COLOUR_CODES)},
    )


def make_vision_view_task(seed: int = 0, **sizes: int) -> TaskData:
    """``vision_view``: :func:`make_vision_task`'s grids with the privilege in the teacher's
    pixels (see the module docstring)."""
    return make_vision_task(seed=seed, task="vision_view", **sizes)
