"""Synthetic text tasks, generated in-process, for offline demos and tests.

Why synthetic: no dataset hub is reachable here, yet the demo must show OPSD teaching a model
something it can only do with the privileged information. Multi-step arithmetic fits: the
privileged trace spells out every intermediate result, so the teacher context makes the answer
easy to copy while the student context must compute it.
"""

from __future__ import annotations

import random

from opsd_mm.types import Example


def _arithmetic_item(rng: random.Random, steps: int, max_operand: int) -> tuple[str, str, int]:
    value = rng.randint(1, max_operand)
    expr = str(value)
    lines = []
    for _ in range(steps):
        op = rng.choice("+-")
        operand = rng.randint(1, max_operand)
        new = value + operand if op == "+" else value - operand
        lines.append(f"{value} {op} {operand} = {new}")
        expr = f"{expr} {op} {operand}"
        value = new
    trace = ". ".join(lines) + f". The answer is \\boxed{{{value}}}."
    return expr, trace, value


def make_arithmetic_examples(
    n: int, seed: int = 0, steps: int = 2, max_operand: int = 9, split: str = "train"
) -> list[Example]:
    """``n`` arithmetic examples: question ``a + b - c``, privileged step-by-step trace, answer.

    ``split`` salts the seed so that train/validation/test draws differ; questions repeated
    across splits are not removed (the space is small on purpose for tiny models).
    """
    rng = random.Random(f"arith-{seed}-{split}")
    out = []
    for i in range(n):
        expr, trace, value = _arithmetic_item(rng, steps, max_operand)
        out.append(
            Example(
                id=f"arith-{split}-{i}",
                question=f"Compute {expr}.",
                privileged=trace,
                answer=str(value),
                meta={"task": "arithmetic", "steps": steps},
            )
        )
    return out


SYNTHETIC_TASKS = {"arithmetic": make_arithmetic_examples}
