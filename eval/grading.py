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
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from opsd_mm.eval.worker import Worker

DEFAULT_TIMEOUT_S = 10.0

# ----------------------------------------------------------------------------- boxed answers

_BOX_PATTERNS: dict[tuple[str, ...], re.Pattern[str]] = {}


def _box_pattern(commands: Sequence[str]) -> re.Pattern[str]:
    key = tuple(commands)
    if key not in _BOX_PATTERNS:
        alternatives = "|".join(re.escape(c) for c in key)
        _BOX_PATTERNS[key] = re.compile(rf"\\(?:{alternatives})\s*\{{")
    return _BOX_PATTERNS[key]


def last_boxed(text: str, commands: Sequence[str] = ("boxed",)) -> str | None:
    """Content of the last ``\\boxed{...}`` (or another listed command) with balanced braces.

    The last box whose braces close, so a truncated final box falls back to the previous
    complete one. Escaped braces (``\\{``: a brace right after a backslash) do not count.

    Linear in the length of ``text`` (a hostile answer may hold thousands of unclosed boxes):
    the brace depth after every character is one cumulative sum, and box ``i`` (content from
    ``s_i``) closes at the first position where the depth drops below its depth at ``s_i``.
    Only the segment up to the next box start ``s_(i+1)`` needs looking at: if box ``i`` closed
    after ``s_(i+1)``, box ``i+1`` would be nested in it and close first, so the last closing box
    is the last one that closes inside its own segment. The scan from each start that this
    replaces is kept as ``bench/grading_legacy.py:last_boxed`` and checked against this one.
    """
    starts = [m.end() for m in _box_pattern(commands).finditer(text)]
    if not starts:
        return None
    import numpy as np

    # One byte per character: only ``{``, ``}`` and ``\\`` matter; anything else becomes ``?``.
    codes_T = np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8)
    step_T = (codes_T == ord("{")).astype(np.int32) - (codes_T == ord("}"))
    step_T[1:][codes_T[:-1] == ord("\\")] = 0
    depth_T = np.cumsum(step_T, dtype=np.int64)  # depth after each character
    starts = [s for s in starts if s < len(text)]  # a box opened at the very end never closes
    if not starts:
        return None
    # The depth just before each box's content (after its opening brace) is the segment's base.
    base_B = depth_T[np.asarray(starts) - 1]
    low_B = np.minimum.reduceat(depth_T, starts)
    closed = np.flatnonzero(low_B < base_B)
    if len(closed) == 0:
        return None
    i = int(closed[-1])
    start = starts[i]
    end = starts[i + 1] if i + 1 < len(starts) else len(text)
    close = start + int(np.argmax(depth_T[start:end] < base_B[i]))
    return text[start:close]


# ----------------------------------------------------------------------------- the guard
# math-verify and latex2sympy evaluate integer powers exactly: ``9^{9^{9^9}}`` or
# ``10^{10^{100}}`` never finish (the item sits at its deadline), ``3^{10^6}`` against
# ``3^{1000000}`` takes longer than 20 s, and a literal of more than 4,300 digits exceeds
# Python's int-string limit (sympy then reports an error, a digit run of 20,000 with ``.0``
# already costs 5 s); their parsers take exponential time in the brace nesting depth. Such
# expressions are compared as normalised strings instead, and the score says so
# (``graded_by_guard``); the per-item deadline stays as the last line of defence.

# Longest digit run handed to symbolic evaluation: Python's default int-string limit.
MAX_LITERAL_DIGITS = 4300
# Largest estimated size, in decimal digits, of an integer power (``3^{10^5}`` is 47,713).
MAX_POWER_DIGITS = 100_000
# Deepest brace nesting: math-verify's parse time grows exponentially with it (12 levels of
# ``{`` take 3 s, 14 run past a 20 s deadline; 16 of ``\\frac{`` take 8 s), latex2sympy's too.
MAX_NESTING = 12

# ``(?<!\\d)``: only a digit run's first character starts a match, so a long run is scanned once.
_LONG_DIGITS = re.compile(rf"(?<!\d)\d{{{MAX_LITERAL_DIGITS + 1}}}")
_FLATTEN = re.compile(r"\\left|\\right|[\s{}()\[\]$]")
_NUM = r"\d+(?:\.\d+)?"
_POWER_CHAIN = re.compile(rf"(?<![\d.]){_NUM}(?:\^[-+]?{_NUM})+")


def _chain_digits(chain: str) -> float:
    """Decimal digits of ``a^b^...^z`` (right-associative), estimated in log space: the
    exponent's value times log10 of the base, from the top down; ``inf`` past float range."""
    parts = [abs(float(p)) for p in chain.split("^")]
    log10_value = math.log10(parts[-1]) if parts[-1] > 0 else -math.inf
    for base in reversed(parts[:-1]):
        if log10_value > 300:
            return math.inf
        exponent = 10.0**log10_value
        scale = abs(math.log10(base)) if base > 0 else 0.0
        log10_value = exponent * scale if scale else 0.0
    return log10_value


def _too_deep(expr: str) -> bool:
    """``{`` nested more than ``MAX_NESTING`` deep (a stray ``}`` closes nothing; an unclosed
    ``{`` counts)."""
    if expr.count("{") <= MAX_NESTING:
        return False
    import numpy as np

    codes_T = np.frombuffer(expr.encode("ascii", "replace"), dtype=np.uint8)
    raw_T = np.cumsum((codes_T == ord("{")).astype(np.int64) - (codes_T == ord("}")))
    # Depth floored at 0: subtract the lowest point reached so far below zero.
    return int((raw_T - np.minimum.accumulate(np.minimum(raw_T, 0))).max()) > MAX_NESTING


def beyond_symbolic(expr: str) -> bool:
    """True when ``expr`` is too big for exact symbolic evaluation in time: braces nested more
    than ``MAX_NESTING`` deep, a digit run longer than ``MAX_LITERAL_DIGITS`` or an integer
    power chain (``9^{9^{9^9}}``, ``10^{-10^{100}}``, ``2**2**64``) estimated at more than
    ``MAX_POWER_DIGITS`` digits. Brackets are ignored for the estimate, so ``(10^{10})^{10}``
    is counted as a tower (an overestimate). Linear in ``len(expr)``."""
    if _LONG_DIGITS.search(expr) or _too_deep(expr):
        return True
    flat = _FLATTEN.sub("", expr).replace("**", "^")
    return any(_chain_digits(m.group()) > MAX_POWER_DIGITS for m in _POWER_CHAIN.finditer(flat))


_NOISE = re.compile(r"\\(?:left|right|displaystyle|[,;:! ])|[\s$]")
_WRAPPED = re.compile(r"\\(?:boxed|fbox)\{(.*)\}", flags=re.S)
_SINGLE_GROUP = re.compile(r"(?<!\\)\{([^{}\\])\}")


def guard_normalise(expr: str) -> str:
    """The string the guard compares: no spacing, ``$``, ``\\left``/``\\right`` or outer
    ``\\boxed{}``, ``\\dfrac``/``\\tfrac`` as ``\\frac``, one-character groups unbraced
    (``9^{9}`` as ``9^9``), no trailing period."""
    s = _NOISE.sub("", expr).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    wrapped = _WRAPPED.fullmatch(s)
    if wrapped:
        s = wrapped.group(1)
    return _SINGLE_GROUP.sub(r"\1", s).rstrip(".")


def guard_verdict(gold: str, pred: str) -> Verdict | None:
    """The guard's verdict when either side is :func:`beyond_symbolic` (normalised strings
    equal), else None: the caller goes on to the symbolic check."""
    if beyond_symbolic(gold) or beyond_symbolic(pred):
        return Verdict(guard_normalise(gold) == guard_normalise(pred), graded_by_guard=True)
    return None


# ----------------------------------------------------------------------------- timeout worker


@dataclass(frozen=True)
class Verdict:
    """Outcome of a guarded symbolic check: ``timed_out`` implies ``correct`` is False;
    ``graded_by_guard``: decided by string comparison, the expression being beyond symbolic
    evaluation (:func:`guard_verdict`)."""

    correct: bool
    timed_out: bool = False
    error: str | None = None
    graded_by_guard: bool = False


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
    """math-verify equivalence of a gold answer and an extracted prediction (LaTeX strings);
    :func:`guard_verdict` first for expressions beyond symbolic evaluation."""
    if pred.strip() == gold.strip():
        return Verdict(True)
    by_guard = guard_verdict(gold, pred)
    if by_guard is not None:
        return by_guard
    return guarded(_math_verify_job, (gold, pred), timeout)
