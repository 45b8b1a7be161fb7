"""Shared grading rules: boxed extraction and math-verify under a process-level timeout."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from opsd_mm.eval import grading as g


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{a}{b^{2}}} done", "\\frac{a}{b^{2}}"),
        ("first \\boxed{1} then \\boxed{\\sqrt{\\frac{1}{2}}}", "\\sqrt{\\frac{1}{2}}"),
        ("sets \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed {7}", "7"),
        ("\\boxed{3} then a cut-off \\boxed{\\frac{1}{", "3"),  # last box unbalanced
        ("no box here", None),
        ("\\fbox{5}", None),  # only \boxed by default
    ],
)
def test_last_boxed(text, expected):
    assert g.last_boxed(text) == expected


def test_last_boxed_accepts_fbox_when_asked():
    assert g.last_boxed("\\boxed{1} and \\fbox{2}", ("boxed", "fbox")) == "2"


@pytest.mark.parametrize(
    "gold, pred, ok",
    [
        ("\\frac{1}{2}", "0.5", True),
        ("0.5", "\\frac{1}{2}", True),
        ("\\frac{\\sqrt{3}}{4}", "\\frac{1}{4}\\sqrt{3}", True),
        ("\\{-2, 2\\}", "\\{2, -2\\}", True),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", True),
        ("24", "25", False),
        ("24", "", False),
    ],
)
def test_math_equal(gold, pred, ok):
    v = g.math_equal(gold, pred)
    assert v.correct is ok and not v.timed_out


def test_timeout_kills_the_call_and_the_worker_recovers():
    t0 = time.monotonic()
    assert g.call_with_timeout(time.sleep, (30,), timeout=0.5) == ("timeout", None)
    assert time.monotonic() - t0 < 10
    # The next call gets a fresh worker.
    assert g.math_equal("\\frac{1}{2}", "0.5").correct


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an unreaped one is dead too)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_timeout_kills_what_the_call_started_too(tmp_path):
    """A grader that starts a process of its own (here ``sh`` running ``sleep``) and runs past
    its deadline: the worker is killed with everything it started, nothing is left running."""
    pid_file = tmp_path / "pid"
    script = f"echo $$ > {pid_file}; exec sleep 60"
    assert g.call_with_timeout(subprocess.call, (["sh", "-c", script],), timeout=2) == (
        "timeout",
        None,
    )
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(pid), f"the grader's own process {pid} outlived the timeout"


def test_timed_out_check_scores_zero_and_says_so(monkeypatch):
    monkeypatch.setattr(g, "call_with_timeout", lambda fn, args, timeout: ("timeout", None))
    assert g.math_equal("\\frac{1}{2}", "0.5") == g.Verdict(False, timed_out=True)


def test_worker_reports_errors_without_dying():
    status, msg = g.call_with_timeout(int, ("not a number",), timeout=5)
    assert status == "error" and "ValueError" in msg
    assert g.call_with_timeout(abs, (-3,), timeout=5) == ("ok", 3)
