"""Every scorer on hostile answers, the linear graders beside the ones they replaced.

    .venv/bin/python bench/grading.py                    # 2 MB cases, old scorers stopped at 10 s
    .venv/bin/python bench/grading.py --size 200000 --limit 60 --only mmmu_open,aime24

A model under training writes long, broken answers (a repetition loop at 32k tokens is ~100 KB),
and the same graders score the training reward. Each case below is scored by every benchmark's
``score`` (on one fixture item of the real schema, tests/fixtures) and by the two training
rewards, twice: ``new`` is the code as it is, ``old`` the same code with today's parsers put
back (bench/grading_legacy.py: the quadratic ``last_boxed``, ZeroBench's regex, MMMU's patterns
and parser, the pure-Python edit distance, MathVista's quick-rule regex, MathVision's greedy
box regex, AMO-Bench's clean-up loops) and no guard before math-verify. Each (variant, scorer,
case) runs in the grading worker's child process (opsd_mm/eval/worker.py) under ``--limit``
seconds, so an old scorer that does not finish is reported as ``>limit`` and killed; the time
spent in math-verify / latex2sympy (run in that same process, so under the same limit instead
of its own deadline of 10 s, 60 s for AMO-Bench) is reported apart ("symb."), as is whether the
guard graded the item.

Targets (issue 26): every item under 1 s outside math-verify at 2 MB; no item at the deadline
for the exponent towers. Verdicts of new and old must agree wherever old finishes.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench.* and tests.fixtures from the repo root
    sys.path.insert(0, str(ROOT))

MB = 1_000_000
WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which "
    "so answer therefore value equals final result could thus"
).split()


def cases(size: int) -> dict[str, str]:
    """The hostile answers, ``size`` characters where the case has a size."""
    rng = random.Random(0)
    prose = " ".join(rng.choice(WORDS) for _ in range(size // 4))[:size]
    return {
        "unclosed \\boxed{": "\\boxed{" * (size // 7),
        "unclosed {": "{" * size,
        "unclosed { per line": ("{a " * 40 + "\n") * (size // 121),
        "100k-digit number": "The answer is " + "7" * 100_000,
        "100k digits, comma": "so it is " + "1" * 100_000 + ",",
        "100k digits, e": "so it is 1." + "2" * 100_000 + "e",
        "tower 9^{9^{9^9}}": "### The final answer is: $\\boxed{9^{9^{9^9}}}$",
        "tower 10^{10^{100}}": "### The final answer is: $\\boxed{10^{10^{100}}}$",
        "prose": prose,
        "NUL bytes": "\x00" * size,
        "NUL + box + digits": ("\x00\\boxed{1" + "0" * 50 + "\x00") * (size // 60),
        'The answer is " loop': 'The answer is "' * (size // 15),
        "spaces before }": "### The final answer is: $" + " " * size + "}$",
        "oxe{}d{ loop": "oxe{}d{" * (size // 7),
    }


def scorers() -> dict[str, Callable[[str], Any]]:
    """Scorer name -> ``score(response) -> (verdict, graded_by_guard)``, on fixture items."""
    from opsd_mm.eval.registry import get_benchmark
    from opsd_mm.eval.rewards import ChoiceReward, MathVerifyReward
    from opsd_mm.types import Example
    from tests.fixtures.benchmarks import fixture_rows

    def bench(name: str, item_id: str) -> Callable[[str], Any]:
        b = get_benchmark(name)
        item = next(r for r in fixture_rows(name) if b.item_id(r) == item_id)

        def score(response: str) -> Any:
            s = b.score(dict(item), response)
            return bool(s["correct"]), bool(s.get("graded_by_guard"))

        return score

    def reward(r: Any, answer: str) -> Callable[[str], Any]:
        def score(response: str) -> Any:
            (s,) = r([Example(id="x", question="q", answer=answer)], [response])
            return s.value, s.graded_by_guard

        return score

    return {
        "mmmu_choice": bench("mmmu", "validation_Math_1"),
        "mmmu_open": bench("mmmu", "validation_Physics_3"),
        "mathvista_choice": bench("mathvista", "2"),
        "mathvista_integer": bench("mathvista", "1"),
        "mathvision": bench("mathvision", "1"),
        "wemath": bench("wemath", "1:2steps_1"),
        "zerobench": bench("zerobench", "1"),
        "aime24": bench("aime24", "60"),
        "math500": bench("math500", "test/prealgebra/1.json"),
        "amo_bench": bench("amo_bench", "1"),
        "reward_math": reward(MathVerifyReward(), "24"),
        "reward_choice": reward(ChoiceReward(), "B"),
    }


@contextlib.contextmanager
def old_parsers() -> Iterator[None]:
    """Put today's parsers back where the benchmarks look them up, and switch the guard off."""
    from bench import grading_legacy as old
    from opsd_mm.eval import grading
    from opsd_mm.eval.benchmarks import _mathvision_rules, amo_bench, mathvista, mmmu, zerobench

    patches = [
        (grading, "last_boxed", old.last_boxed),
        (grading, "guard_verdict", lambda gold, pred: None),
        (zerobench, "parse_curly", old.zerobench_parse_curly),
        (mmmu, "mmmu_extract_numbers", old.mmmu_extract_numbers),
        (mmmu, "mmmu_parse_open", old.mmmu_parse_open),
        (mathvista, "levenshtein", old.levenshtein),
        (mathvista, "_quick", old.mathvista_quick),
        (_mathvision_rules, "_greedy_boxed", old.mathvision_boxed),
        (amo_bench, "strip_before_brace", old.amo_strip_before_brace),
    ]
    saved = [(m, name, getattr(m, name)) for m, name, _ in patches]
    for m, name, fn in patches:
        setattr(m, name, fn)
    try:
        yield
    finally:
        for m, name, fn in saved:
            setattr(m, name, fn)


_SCORERS: dict[str, Callable[[str], Any]] = {}


def warm() -> None:
    """Runs in the worker: build the scorers (imports, fixture items) before any timed call,
    so that a fresh worker's start-up never counts against an item's limit."""
    if not _SCORERS:
        _SCORERS.update(scorers())


def time_one(variant: str, scorer: str, case: str, size: int) -> dict[str, Any]:
    """Runs in the worker: score one case, timing the whole and the symbolic part apart. The
    symbolic jobs run right here instead of in a nested worker (whose process would outlive a
    kill of this one), so their own deadline is this item's ``--limit``."""
    from opsd_mm.eval import grading

    if not _SCORERS:
        _SCORERS.update(scorers())
    text = cases(size)[case]
    symbolic = [0.0]
    call = grading.call_with_timeout

    def timed_call(fn: Any, args: tuple = (), timeout: float = grading.DEFAULT_TIMEOUT_S) -> Any:
        t0 = time.perf_counter()
        try:
            return "ok", fn(*args)
        except Exception as e:
            return "error", f"{type(e).__name__}: {e}"
        finally:
            symbolic[0] += time.perf_counter() - t0

    grading.call_with_timeout = timed_call
    try:
        with old_parsers() if variant == "old" else contextlib.nullcontext():
            t0 = time.perf_counter()
            verdict, by_guard = _SCORERS[scorer](text)
            total = time.perf_counter() - t0
    finally:
        grading.call_with_timeout = call
    return {"total": total, "symbolic": symbolic[0], "verdict": verdict, "guard": by_guard}


def main() -> None:
    from opsd_mm.eval.worker import Worker

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=2 * MB, help="characters of the sized cases")
    p.add_argument("--limit", type=float, default=10.0, help="seconds before a scorer is killed")
    p.add_argument("--only", help="comma-separated scorers (default: all)")
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--skip-old", action="store_true", help="time the new scorers only")
    args = p.parse_args()
    names = args.only.split(",") if args.only else list(scorers())
    case_names = args.cases.split(",") if args.cases else list(cases(10))
    worker = Worker()
    print(f"size {args.size:,} characters; limit {args.limit:g} s per item; seconds per item")
    sys.stdout.flush()
    print(
        f"{'scorer':<18} {'case':<22} {'new':>8} {'(symb.)':>8} {'guard':>5} "
        f"{'old':>8} {'(symb.)':>8} {'old/new':>8}  verdicts"
    )
    worst_outside, at_deadline = 0.0, []
    for scorer in names:
        for case in case_names:
            got = {}
            for variant in ("new",) if args.skip_old else ("new", "old"):
                worker.call(warm, (), 600)  # instant unless the last item killed the worker
                status, value = worker.call(
                    time_one, (variant, scorer, case, args.size), args.limit
                )
                got[variant] = value if status == "ok" else status
            new, old = got["new"], got.get("old")

            def shown(r: Any) -> tuple[str, str]:
                if r is None:
                    return "-", "-"
                if not isinstance(r, dict):
                    return (f">{args.limit:g}" if r == "timeout" else r), "-"
                return f"{r['total']:.3f}", f"{r['symbolic']:.3f}"

            (nt, ns), (ot, os_) = shown(new), shown(old)
            ratio, agree = "-", "-"
            if isinstance(new, dict):
                worst_outside = max(worst_outside, new["total"] - new["symbolic"])
                if "tower" in case and new["symbolic"] >= min(args.limit, 10.0) * 0.95:
                    at_deadline.append(f"{scorer}/{case}")
                if isinstance(old, dict):
                    ratio = f"{old['total'] / max(new['total'], 1e-6):.0f}x"
                    agree = "same" if old["verdict"] == new["verdict"] else "DIFFER"
                elif old == "timeout":
                    ratio = f">{args.limit / max(new['total'], 1e-6):.0f}x"
            guard = "yes" if isinstance(new, dict) and new["guard"] else ""
            print(
                f"{scorer:<18} {case:<22} {nt:>8} {ns:>8} {guard:>5} {ot:>8} {os_:>8} "
                f"{ratio:>8}  {agree}",
                flush=True,
            )
    worker.close()
    print(f"slowest new item outside math-verify: {worst_outside:.3f} s (target < 1 s)")
    print(f"tower items at the deadline: {at_deadline or 'none'}")


if __name__ == "__main__":
    # Imported as bench.grading so that the worker can unpickle time_one by reference.
    from bench.grading import main as _main

    _main()
