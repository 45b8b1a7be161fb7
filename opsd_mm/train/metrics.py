"""Step metrics: pure summaries of a step's tensors and rollouts, and a JSONL writer.

``metrics.jsonl`` is always written (one object per optimizer step, flushed each time, so a
crash loses nothing already logged); accelerate trackers get the same dict when configured.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


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
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to ``step``, rewritten atomically; a torn last
    line (a kill mid-write) is dropped too."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step and line.endswith("\n"):
            kept.append(line)
    if kept != lines:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
