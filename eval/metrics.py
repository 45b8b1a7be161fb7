"""Aggregate metrics over scored records.

A record is one benchmark item as the runner writes it: ``scores`` holds one score dict per
sample (each with ``correct``, ``extracted``, ``rule``, optionally ``timed_out``), ``meta`` the
item's categories, and ``error`` a message when the item could not be run (then ``scores`` is
empty and every sample counts as wrong, so denominators stay the benchmark's item count).

Shape legend: ``correct_I_K`` is indexed [item][sample].
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

Record = dict[str, Any]


def num_samples(records: Sequence[Record]) -> int:
    """Samples per item (the largest count seen; errored items have none)."""
    return max((len(r.get("scores") or []) for r in records), default=0) or 1


def correct_matrix(records: Sequence[Record], key: str = "correct") -> list[list[bool]]:
    """``correct_I_K``; an errored or short item is padded with False."""
    k = num_samples(records)
    out = []
    for r in records:
        row = [bool(s.get(key)) for s in (r.get("scores") or [])]
        out.append(row + [False] * (k - len(row)))
    return out


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def avg_at_k(correct_I_K: Sequence[Sequence[bool]]) -> float:
    """Mean correctness over items and samples (avg@k; plain accuracy when k == 1)."""
    return _mean(_mean(map(float, row)) for row in correct_I_K)


def pass_at_k(correct_I_K: Sequence[Sequence[bool]], k: int) -> float:
    """Unbiased pass@k from n >= k samples per item: 1 - C(n-c, k) / C(n, k)."""
    vals = []
    for row in correct_I_K:
        n, c = len(row), sum(row)
        if n < k:
            raise ValueError(f"pass@{k} needs at least {k} samples per item, got {n}")
        vals.append(1.0 - (math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 0.0))
    return _mean(vals)


def all_k(correct_I_K: Sequence[Sequence[bool]]) -> float:
    """Share of items answered correctly in every sample (ZeroBench's k/k reliability)."""
    return _mean(float(all(row)) for row in correct_I_K)


def maj_at_k(records: Sequence[Record]) -> float:
    """Majority vote over the extracted answers of each item's samples; ties go to the answer
    seen first; samples without an extracted answer do not vote."""
    vals = []
    for r in records:
        scores = r.get("scores") or []
        votes = Counter(
            str(s["extracted"]).strip() for s in scores if s.get("extracted") not in (None, "")
        )
        if not votes:
            vals.append(0.0)
            continue
        top = max(votes.values())
        winner = next(a for a in votes if votes[a] == top)
        ok = any(s.get("correct") for s in scores if str(s.get("extracted", "")).strip() == winner)
        vals.append(float(ok))
    return _mean(vals)


def sample_metrics(records: Sequence[Record], *, majority: bool = False) -> dict[str, float]:
    """``accuracy`` (avg@k), and with k > 1 samples ``avg@k``, ``pass@k`` (and ``maj@k``)."""
    c = correct_matrix(records)
    k = num_samples(records)
    out = {"accuracy": avg_at_k(c)}
    if k > 1:
        out[f"avg@{k}"] = out["accuracy"]
        out[f"pass@{k}"] = pass_at_k(c, k)
        if majority:
            out[f"maj@{k}"] = maj_at_k(records)
    return out


def grouped_accuracy(
    records: Sequence[Record], field: str | Callable[[Record], Any]
) -> dict[str, dict[str, float]]:
    """Accuracy (avg over samples) per value of ``meta[field]``; a list value counts the item
    under each element (MathVista's skills, HMMT's problem types). Keys are sorted."""
    groups: dict[str, list[float]] = {}
    for r, row in zip(records, correct_matrix(records)):
        value = field(r) if callable(field) else (r.get("meta") or {}).get(field)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is None or v == "":
                continue
            groups.setdefault(str(v), []).append(_mean(map(float, row)))
    return {
        g: {"accuracy": _mean(xs), "correct": sum(xs), "total": len(xs)}
        for g, xs in sorted(groups.items())
    }


def count_flag(records: Sequence[Record], flag: str) -> int:
    """Number of samples whose score dict has ``flag`` set (e.g. ``timed_out``)."""
    return sum(bool(s.get(flag)) for r in records for s in (r.get("scores") or []))


def rule_counts(records: Sequence[Record]) -> dict[str, int]:
    """How many samples each extraction rule handled (sorted by rule name)."""
    c = Counter(str(s.get("rule")) for r in records for s in (r.get("scores") or []))
    return dict(sorted(c.items()))


def judge_counts(records: Sequence[Record]) -> dict[str, int]:
    """``judge_calls``: the judge replies behind the scores (one request each, sent by this run
    or stored by an earlier one, so re-scoring counts the same); ``judge_errors``: those the
    endpoint rejected as too long (scored as an empty reply)."""
    entries = [e for r in records for s in (r.get("scores") or []) for e in (s.get("judge") or [])]
    return {"judge_calls": len(entries), "judge_errors": sum(1 for e in entries if e.get("error"))}


def base_counts(records: Sequence[Record]) -> dict[str, Any]:
    """Items, errored items, samples per item, timed-out samples, samples graded by the guard
    (an expression beyond symbolic evaluation compared as a string) and rule usage."""
    return {
        "n": len(records),
        "n_errors": sum(1 for r in records if r.get("error")),
        "samples": num_samples(records),
        "n_timeouts": count_flag(records, "timed_out"),
        "n_graded_by_guard": count_flag(records, "graded_by_guard"),
        "rules": rule_counts(records),
    }
