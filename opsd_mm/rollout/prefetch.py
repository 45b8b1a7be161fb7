"""``rollout.async``: the next step's rollouts generate while this step trains.

Why: with the generation server (``rollout.engine=vllm_server``) generation runs in another
process, yet a synchronous trainer waits for it every step and the server idles while the
trainer trains. Overlapping the two pays most when they cost about the same
(``bench/async_rollout.py``).

The price is one step of staleness. Synchronously, the batch trained at step k is sampled from
the weights after step k-1, the ones it trains. Here it is sampled while step k-1 trains, from
the weights after step k-2: one optimizer step behind. Every rollout records the version it
was sampled with (``Rollout.weight_version``); the trainer logs the staleness and the
rollout/trainer log-prob gap, and ``loss.importance_clip`` reweights the off-policy tokens.

Order within a step, on the trainer's thread: take this step's batch (waiting for its
generation to finish), sync the server to the current weights, submit the next step's batch.
So a weight reload never overlaps a generation, the server sees the versions in order, and
which weights sample a batch is fixed by the schedule, never by timing: with every row seeded
by (step seed, prompt key, sample), two runs with the same seed give the same losses.

Checkpoints: the save after step k waits for batch k+1 (in flight, sampled from weights the
checkpoint no longer holds) and records its rollouts, together with the data position of the
steps trained. Resume re-draws batch k+1's examples from that position and trains them on the
recorded rollouts, so a resumed run continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from opsd_mm.rollout.base import RolloutEngine
from opsd_mm.types import Example, Prompt, Rollout, SamplingConfig


@dataclass
class RolloutBatch:
    """One step's student prompts and their rollouts.

    ``skipped``: (error, what) for the examples left out while the prompts were built, counted
    when the batch trains (not when it is drawn, one step early). ``data_before``: the data
    stream's position before this batch was drawn, which a checkpoint taken while the batch is
    in flight records."""

    step: int  # the trainer step (1-based) that trains it
    examples: list[Example]
    prompts: list[Prompt]
    skipped: list[tuple[ValueError, str]]
    data_before: dict[str, int]
    rollouts_P_G: list[list[Rollout]] = field(default_factory=list)


class RolloutPrefetcher:
    """At most one batch generating on a worker thread (``engine.generate``), handed over by
    ``take``. The engine is only ever called from one thread at a time: the trainer calls
    ``sync_weights`` only after ``take`` or ``wait`` has returned."""

    def __init__(self, engine: RolloutEngine) -> None:
        self.engine = engine
        self._pool: ThreadPoolExecutor | None = None
        self._batch: RolloutBatch | None = None
        self._future: Future | None = None

    def submit(self, batch: RolloutBatch, n: int, sampling: SamplingConfig) -> None:
        if self._batch is not None:
            raise RuntimeError(f"step {self._batch.step}'s batch is still pending")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opsd-rollout")
        self._batch = batch
        self._future = self._pool.submit(self.engine.generate, batch.prompts, n, sampling)

    def wait(self) -> RolloutBatch | None:
        """The pending batch with its rollouts (waiting for them), kept pending; None when
        nothing is pending. A generation error is raised here, on the trainer's thread."""
        if self._future is not None:
            future, self._future = self._future, None
            try:
                self._batch.rollouts_P_G = future.result()
            except BaseException:
                self._batch = None
                raise
        return self._batch

    def take(self, step: int) -> RolloutBatch | None:
        """Step ``step``'s batch, no longer pending; None when none was generated for it (the
        first step, or a resume from a checkpoint without one)."""
        batch = self.wait()
        self._batch = None
        if batch is not None and batch.step != step:
            raise RuntimeError(f"the batch generated ahead is step {batch.step}'s, not {step}'s")
        return batch

    def put(self, batch: RolloutBatch) -> None:
        """Make a finished batch pending (resume: the batch a checkpoint recorded)."""
        if self._batch is not None:
            raise RuntimeError(f"step {self._batch.step}'s batch is still pending")
        self._batch = batch

    def close(self) -> None:
        """Drop the pending batch (the end of ``Trainer.train``, also on an error); a
        generation in flight is not waited for. ``submit`` may be called again afterwards."""
        self._batch, self._future = None, None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def rollouts_to_state(rollouts_P_G: list[list[Rollout]]) -> list[list[dict[str, Any]]]:
    """Rollouts as JSON-ready dicts (a checkpoint's ``state.json``)."""
    return [[dataclasses.asdict(r) for r in group] for group in rollouts_P_G]


def rollouts_from_state(state: list[list[dict[str, Any]]]) -> list[list[Rollout]]:
    return [[Rollout(**r) for r in group] for group in state]


def staleness_metrics(rollouts_P_G: list[list[Rollout]], trained_version: int) -> dict[str, float]:
    """How many optimizer steps behind the trained weights (``trained_version``: the trainer
    step they come from) the rollouts were sampled, mean and max. Rollouts without a version
    (an engine sampling the live model) count as 0."""
    lags = [
        trained_version - r.weight_version if r.weight_version is not None else 0
        for group in rollouts_P_G
        for r in group
    ] or [0]
    return {
        "rollout/staleness_mean": sum(lags) / len(lags),
        "rollout/staleness_max": float(max(lags)),
    }
