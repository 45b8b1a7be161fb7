"""Step metrics: pure summaries of a step's tensors and rollouts, and a JSONL writer.

``metrics.jsonl`` is always written (one object per optimizer step, flushed each time, so a
crash loses nothing already logged); accelerate trackers get the same dict when configured.
Reading it (``opsd-mm plot``, ``--resume``) expects damage: a line torn by a kill, or garbled,
is skipped with a warning naming the file and line, and ``--resume`` moves such lines to
``metrics.jsonl.garbled`` rather than dropping them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def repetition_rate(completions: Sequence[Sequence[int]], n: int = 4) -> float:
    """Mean over completions of the fraction of n-grams that already occurred earlier in the
    same completion - a cheap degeneration signal (looping rollouts score near 1)."""
    rates = []
    for ids in completions:
        grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def summarize_tokens(values_N: torch.Tensor, prefix: str) -> dict[str, float]:
    """Mean, p99 and max of a per-token tensor (empty -> zeros)."""
    if values_N.numel() == 0:
        return {f"{prefix}_mean": 0.0, f"{prefix}_p99": 0.0, f"{prefix}_max": 0.0}
    v = values_N.detach().float().flatten()
    return {
        f"{prefix}_mean": v.mean().item(),
        f"{prefix}_p99": torch.quantile(v, 0.99).item() if v.numel() > 1 else v.item(),
        f"{prefix}_max": v.max().item(),
    }


def pad_logprobs(logprobs_B: Sequence[Sequence[float] | None], width_C: int) -> torch.Tensor:
    """Engine log-probabilities laid out like ``completion_ids_BC`` ([B, C], NaN where a
    rollout has none or is shorter), so the trainer can select them with its own mask."""
    out_BC = torch.full((len(logprobs_B), width_C), float("nan"))
    for i, lps in enumerate(logprobs_B):
        if lps:
            n = min(len(lps), width_C)
            out_BC[i, :n] = torch.tensor(list(lps[:n]), dtype=torch.float32)
    return out_BC


def logprob_gap(engine_logprobs_N: torch.Tensor, trainer_logprobs_N: torch.Tensor) -> float:
    """mean |log p_engine - log p_trainer| over the sampled tokens (NaN entries ignored).

    Both sides are log p of the sampled token under the unmodified (temperature-1) model
    distribution. On fp32 weights right after a sync it measures numerical disagreement
    (~1e-6); under bf16 or with ``rollout.sync_every > 1`` it also shows how far off-policy the
    rollouts are. NaN when no token has both values.
    """
    diff_N = (engine_logprobs_N.float().cpu() - trainer_logprobs_N.detach().float().cpu()).abs()
    diff_N = diff_N[~diff_N.isnan()]
    return diff_N.mean().item() if diff_N.numel() else float("nan")


class PhaseTimer:
    """Accumulates wall time per named phase (rollout, teacher, student, optimizer...)."""

    def __init__(self, sync_cuda: bool = False) -> None:
        self.seconds: dict[str, float] = {}
        self.sync_cuda = sync_cuda

    @contextmanager
    def phase(self, name: str):
        if self.sync_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync_cuda:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def as_metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


class MetricsWriter:
    """Appends one JSON object per line to ``path`` and flushes it immediately."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        try:
            self._fh.write(json.dumps(clean) + "\n")
            self._fh.flush()
        except OSError as e:  # a full disk: name the file (the write's own error does not)
            raise OSError(e.errno, e.strerror, str(self.path)) from e

    def close(self) -> None:
        self._fh.close()


# Per-line warnings about unreadable lines, per file read; the rest are counted in one more.
MAX_LINE_WARNINGS = 20


def _parse_line(raw: bytes, terminated: bool) -> tuple[dict[str, Any] | None, str]:
    """(the row, "") of one ``metrics.jsonl`` line, or (None, why it is unreadable). A row is a
    JSON object with an integer ``step``; ``terminated``: the line ended with a newline (only
    the last line of a file can lack one: what a process killed mid-write leaves)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8"
    try:
        row = json.loads(text)
    except json.JSONDecodeError:
        return None, "not JSON" if terminated else "torn (no newline: a process stopped mid-write)"
    if not isinstance(row, dict):
        return None, "not a JSON object"
    step = row.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return None, "no integer 'step'"
    return row, ""


def _read_lines(path: Path, data: bytes) -> list[tuple[int, bytes, dict[str, Any] | None, str]]:
    """(line number, raw bytes, row or None, why) for every non-blank line of ``data`` (the
    bytes of ``path``), with a warning for each unreadable one (the first
    :data:`MAX_LINE_WARNINGS`, then a count)."""
    lines = data.split(b"\n")
    out = []
    bad = 0
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        row, why = _parse_line(raw, terminated=i < len(lines) - 1)
        out.append((i + 1, raw, row, why))
        if row is None:
            bad += 1
            if bad <= MAX_LINE_WARNINGS:
                log.warning("%s, line %d: %s; skipped", path, i + 1, why)
    if bad > MAX_LINE_WARNINGS:
        log.warning("%s: %d more unreadable lines skipped", path, bad - MAX_LINE_WARNINGS)
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (or ``samples.jsonl``), in order. A line that is not a
    row (torn by a kill, garbled, not UTF-8, not an object, without an integer ``step``) is
    skipped with a warning naming the file and the line."""
    path = Path(path)
    return [row for _, _, row, _ in _read_lines(path, path.read_bytes()) if row is not None]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (``--resume``: the rows after it were
    logged after the checkpoint it resumes from), rewritten atomically.

    Unreadable lines (a torn last line, garbled ones, see :func:`read_metrics`) are never
    dropped: they are appended to ``<file>.garbled`` beside it, with a warning, before the file
    is rewritten without them."""
    if not path.exists():
        return
    data = path.read_bytes()
    lines = _read_lines(path, data)
    kept = [raw for _, raw, row, _ in lines if row is not None and row["step"] <= step]
    garbled = [raw for _, raw, row, _ in lines if row is None]
    rewritten = b"".join(raw + b"\n" for raw in kept)
    if rewritten == data:
        return  # nothing to drop or move
    if garbled:
        side = path.with_name(path.name + ".garbled")
        with side.open("ab") as fh:
            fh.write(b"".join(raw + b"\n" for raw in garbled))
            fh.flush()
            os.fsync(fh.fileno())
        log.warning(
            "moved %d unreadable lines of %s to %s (the rows around them are kept)",
            len(garbled),
            path,
            side,
        )
    later = len(lines) - len(kept) - len(garbled)
    if later:
        log.info("%s: dropped %d rows logged after step %d (resuming from it)", path, later, step)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(rewritten)
    os.replace(tmp, path)
