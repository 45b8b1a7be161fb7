"""Answer extraction and equivalence shared by the benchmarks: the last ``\\boxed{}``, and
math-verify (or a benchmark's own symbolic check) under a hard timeout.

Why a separate worker process: math-verify and latex2sympy can spin for minutes on adversarial
model output, and math-verify's own timeout uses ``signal.alarm``, which only works on the main
thread. Every symbolic comparison therefore runs in one long-lived child process
(:func:`call_with_timeout`, see ``worker.py``); a call past its deadline kills the child, scores
0 and is reported as ``timed_out`` so that aggregates can count it. The child is started on
first use (no import-time side effects).

Pure string rules run in-process. A rule that only one benchmark uses lives in that benchmark's
file (MMMU's parsers, MathVista's edit distance) or next to it (``_mathvision_rules.py``).
"""

from __future__ import annotations

import atexit
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from opsd_mm.eval.worker import Worker

DEFAULT_TIMEOUT_S = 10.0

# ----------------------------------------------------------------------------- boxed answers


def last_boxed(text: str, commands: Sequence[str] = ("boxed",)) -> str | None:
    """Content of the last ``\\boxed{...}`` (or another listed command) with balanced braces.

    Scans occurrences from the end and returns the first whose braces close, so a truncated
    final box falls back to the previous complete one. Escaped braces (``\\{``) do not count.
    """
    alternatives = "|".join(re.escape(c) for c in commands)
    pattern = re.compile(rf"\\(?:{alternatives})\s*\{{")
    starts = [m.end() for m in pattern.finditer(text)]
    for start in reversed(starts):
        depth = 1
        i = start
        while i < len(text):
            ch = text[i]
            if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
                i += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
            i += 1
    return None


# ----------------------------------------------------------------------------- timeout worker


@dataclass(frozen=True)
class Verdict:
    """Outcome of a guarded symbolic check: ``timed_out`` implies ``correct`` is False."""

    correct: bool
    timed_out: bool = False
    error: str | None = None


_WORKER: Worker | None = None
_WORKER_LOCK = threading.Lock()


def call_with_timeout(
    fn: Callable[..., Any], args: tuple = (), timeout: float = DEFAULT_TIMEOUT_S
) -> tuple[str, Any]:
    """Run the picklable module-level ``fn(*args)`` in the grading worker.

    Returns ``("ok", value)``, ``("error", message)`` or ``("timeout", None)``.
    """
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = Worker()
            atexit.register(_WORKER.close)
    return _WORKER.call(fn, args, timeout)


def guarded(fn: Callable[..., Any], args: tuple, timeout: float = DEFAULT_TIMEOUT_S) -> Verdict:
    """:func:`call_with_timeout` as a :class:`Verdict`: a timeout or an error scores 0."""
    status, value = call_with_timeout(fn, args, timeout)
    if status == "timeout":
        return Verdict(False, timed_out=True)
    if status == "error":
        return Verdict(False, error=value)
    return Verdict(bool(value))


# ----------------------------------------------------------------------------- math-verify


def _math_verify_job(gold: str, pred: str) -> bool:
    """Runs in the worker. Both sides are boxed so LaTeX without ``$`` still parses; gold first,
    as math-verify's ``verify`` is not symmetric."""
    from math_verify import parse, verify

    gold_p = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    pred_p = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if not gold_p or not pred_p:
        return False
    return bool(verify(gold_p, pred_p, timeout_seconds=None))


def math_equal(gold: str, pred: str, timeout: float = DEFAULT_TIMEOUT_S) -> Verdict:
    """math-verify equivalence of a gold answer and an extracted prediction (LaTeX strings)."""
    if pred.strip() == gold.strip():
        return Verdict(True)
    return guarded(_math_verify_job, (gold, pred), timeout)
