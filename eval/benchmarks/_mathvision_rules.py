"""MathVision's scoring rules, restated from MATH-V's evaluation/utils.py and evaluate.py.

Kept apart from ``mathvision.py`` because the grading worker imports the module of every job it
runs (``_mathvision_equal_job`` here) inside the call's deadline: this module imports only
``grading``, whereas the benchmark file pulls in torch and datasets, seconds of import time.
"""

from __future__ import annotations

from opsd_mm.eval import grading


# The official helpers build their result with ``+=``; lists joined once keep them linear on
# an answer of thousands of ``\\frac``s whatever the interpreter does with string concatenation.
def _mv_fix_fracs(s: str) -> str:
    parts = s.split("\\frac")
    out = [parts[0]]
    for sub in parts[1:]:
        out.append("\\frac")
        if sub and sub[0] == "{":
            out.append(sub)
            continue
        if len(sub) < 2:
            return s
        a, b = sub[0], sub[1]
        if b != "{":
            out.append("{" + a + "}{" + b + "}" + sub[2:])
        else:
            out.append("{" + a + "}" + b + sub[2:])
    return "".join(out)


def _mv_fix_a_slash_b(s: str) -> str:
    if len(s.split("/")) != 2:
        return s
    a, b = s.split("/")
    try:
        ia, ib = int(a), int(b)
    except ValueError:
        return s
    if s != f"{ia}/{ib}":
        return s
    return "\\frac{" + str(ia) + "}{" + str(ib) + "}"


def _mv_fix_sqrt(s: str) -> str:
    if "\\sqrt" not in s:
        return s
    parts = s.split("\\sqrt")
    out = [parts[0]]
    for sub in parts[1:]:
        if sub and sub[0] != "{":
            out.append("\\sqrt{" + sub[0] + "}" + sub[1:])
        else:
            out.append("\\sqrt" + sub)
    return "".join(out)


def _mv_strip_string(s: str) -> str:
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = s.split("\\text{ ")[0]  # units on the right
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2:
        s = s.split("=")[-1]
    if len(s.split("\\approx")) == 2:
        s = s.split("\\approx")[-1]
    if "sqrt" in s:
        s = _mv_fix_sqrt(s)
    s = s.replace(" ", "")
    if "sqrt" in s:  # the official code only fixes fractions when a sqrt is present
        s = _mv_fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _mv_fix_a_slash_b(s)


def _greedy_boxed(s: str) -> str | None:
    """The last match of the official ``re.findall(r"oxed{(.*)}", s, flags=re.S)`` in linear
    time: the greedy match runs from the first ``oxed{`` to the last ``}``, so there is at most
    one, and none when no ``}`` follows the first ``oxed{`` (the regex finds that out again from
    every later ``oxed{``; it is kept in bench/grading_legacy.py and fuzzed against this)."""
    first = s.find("oxed{")
    close = s.rfind("}")
    return s[first + 5 : close] if first >= 0 and close >= first + 5 else None


def mathvision_find_answer(s: str) -> str:
    """MathVision's ``find_math_answer``: greedy ``oxed{...}`` content, the part after the last
    ``=``/``\\approx``, LaTeX and unit clean-up, then MATH-style string normalisation."""
    s = s.lower().replace("{}", "")
    boxed = _greedy_boxed(s)
    ans = boxed if boxed is not None else s
    if ans.find("}") != -1 and (ans.find("{") == -1 or ans.find("}") < ans.find("{")):
        ans = ans.split("}")[0]
    ans = ans.split("=")[-1].split("\\approx")[-1]
    for old, new in (
        (" ", ""),
        ("\\,", ""),
        ("∞", "\\infty"),
        ("+\\infty", "\\infty"),
        ("\\\\", "\\"),
        ("\n", ""),
        ("\\text", ""),
        ("\\mbox", ""),
        ("bmatrix", "pmatrix"),
        ("\\left", ""),
        ("\\right", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("{m}^3", ""),
        ("m^3", ""),
        ("{units}", ""),
        ("units", ""),
        ("{km}", ""),
        ("km", ""),
    ):
        ans = ans.replace(old, new)
    return _mv_strip_string(ans)


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


_MV_FLAGS = (
    "the final answer is",
    "the answer is",
    "the correct answer is",
    "the answer should be",
)


def mathvision_extract(response: str) -> tuple[str, str]:
    """MathVision's official answer extraction; returns ``(answer, rule)``.

    Rules in the official order: a trailing/leading option letter (``letter``), a number after
    the last ``is `` (``is_number``), answer phrases when no box is present (``answer_flag``), or
    the last box (``boxed``); ``raw`` when none fired. The result then goes through
    :func:`mathvision_find_answer` and the official letter clean-up.
    """
    ans = response.strip()
    rule = "raw"
    for c in "ABCDE":
        if (
            ans.endswith(f" {c}.")
            or ans.endswith(f" ({c}).")
            or ans.startswith(f"{c}\n")
            or ans.startswith(f"({c})\n")
            or ans.startswith(f"({c}) {c}\n")
        ):
            ans, rule = c, "letter"
    tail = ans.split("is ")[-1].rstrip(".")
    if _is_float(tail):
        ans, rule = tail, "is_number"
    if "oxed{" not in ans:
        for flag in _MV_FLAGS:
            for f in (flag, flag.replace("the", "The")):
                raw = ans
                ans = ans.split(f)[-1].strip()
                if f in raw:
                    ans = ans.split("\n")[0].split(". ")[0]
                    rule = "answer_flag"
    else:
        rule = "boxed"
        if ans.count("oxed{") > 1:
            ans = "\\boxed{" + ans.split("oxed{")[-1]
    ans = mathvision_find_answer(ans)
    for letter in "abcde":
        ans = ans.replace(f"({letter})", letter).replace("{" + letter + "}", letter)
    return ans.rstrip(".").lstrip(":").strip(), rule


def _mv_number(s: str) -> float:
    from latex2sympy2_extended import latex2sympy

    return float(latex2sympy(s).evalf())


def _mv_eval_tuple(s: str) -> str:
    """Round each element of a ``(a,b)``/``[a,b]`` answer to 2 decimals, as the official code."""
    parts = s[1:-1].split(",")
    try:
        if len(parts) > 1 and s[0] + s[-1] in ("()", "[]"):
            vals = [
                sub if "infty" in sub or sub in ("a", "-a") else str(round(_mv_number(sub), 2))
                for sub in parts
            ]
            return s[0] + ",".join(vals) + s[-1]
    except Exception:
        return s
    return s


def _mathvision_equal_job(gold: str, pred: str) -> bool:
    """Runs in the worker: MathVision's ``is_equal`` (string, tuple, then numeric to 2 dp)."""
    pred, gold = pred.lower(), gold.lower()
    if not pred.replace(" ", "") or not gold.replace(" ", ""):
        return False
    if gold.strip() == pred.strip():
        return True
    pred, gold = _mv_eval_tuple(pred), _mv_eval_tuple(gold)
    if gold == pred:
        return True
    try:
        return round(_mv_number(gold), 2) == round(_mv_number(pred), 2)
    except Exception:
        return False


def mathvision_equal(
    gold: str, gold_option: str, pred: str, timeout: float = grading.DEFAULT_TIMEOUT_S
) -> grading.Verdict:
    """Correct if ``pred`` equals the gold letter/value or the option text behind the letter."""
    for g in (gold, gold_option):
        if (
            g.replace(" ", "")
            and pred.replace(" ", "")
            and g.lower().strip() == pred.lower().strip()
        ):
            return grading.Verdict(True)
    timed_out = by_guard = False
    for g in (gold, gold_option):
        # An exponent tower or a huge integer would sit at the deadline in latex2sympy (an
        # empty gold, e.g. no option text, is left to the job, which rejects it at once).
        guard = grading.guard_verdict(g, pred) if g.strip() else None
        v = guard or grading.guarded(_mathvision_equal_job, (g, pred), timeout)
        if v.correct:
            return v
        timed_out, by_guard = timed_out or v.timed_out, by_guard or v.graded_by_guard
    return grading.Verdict(False, timed_out=timed_out, graded_by_guard=by_guard)
