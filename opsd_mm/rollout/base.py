"""What a rollout engine is, and the table of engines ``rollout.engine`` names.

Two protocols: a :class:`RolloutEngine` samples completions from token-id prompts and follows
the trainer's weights; a :class:`ScoringEngine` can also score given completions under the
weights it holds (the teacher's log-probs, ``teacher.scoring=server``). The trainer asks
``isinstance(engine, ScoringEngine)``, never ``hasattr``.

:data:`ENGINES` maps each ``rollout.engine`` name to ``"module:Class"``; the module is imported
only when that engine is built, so a run that never uses vLLM never imports it. Each class
builds itself from the run config (``from_config``). Adding an engine is one class and one row
here (plus its name in ``RolloutConfig.engine``, which a test holds equal to this table).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from opsd_mm.config import RunConfig
from opsd_mm.types import Processor, Prompt, Rollout, SamplingConfig, TeacherScores


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples completions. ``generate`` returns ``rollouts_P_G``: for each prompt, ``n``
    rollouts. ``sync_weights`` makes the engine sample from the trainer's current weights;
    ``version`` (the trainer step they come from) is recorded on the rollouts sampled from them,
    so the trainer can measure how stale its rollouts are."""

    def generate(
        self, prompts: Sequence[Prompt], n: int, sampling: SamplingConfig
    ) -> list[list[Rollout]]: ...

    def sync_weights(self, model: torch.nn.Module, version: int | None = None) -> None: ...


@runtime_checkable
class ScoringEngine(RolloutEngine, Protocol):
    """A rollout engine that also scores completions it did not sample: for each prompt
    (teacher prompt + completion ids), the log-probs of the ids from ``starts[i]`` on, and with
    ``top_k`` > 0 the top-k ids and log-probs at each of those positions (full-vocabulary
    normalised, temperature 1; :class:`~opsd_mm.types.TeacherScores`)."""

    def score(
        self, prompts: Sequence[Prompt], starts: Sequence[int], top_k: int
    ) -> list[TeacherScores]: ...


# rollout.engine -> "module:Class" (imported when built).
ENGINES: dict[str, str] = {
    "hf": "opsd_mm.rollout.hf:HFEngine",
    "vllm": "opsd_mm.rollout.vllm_engine:VLLMEngine",
    "vllm_server": "opsd_mm.rollout.client:ServerEngine",
}


def engine_class(name: str) -> Any:
    """The class registered as ``name`` in :data:`ENGINES`, imported now."""
    if name not in ENGINES:
        raise ValueError(f"rollout.engine={name!r}: unknown engine; choose one of {list(ENGINES)}")
    module, _, cls = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_engine(
    cfg: RunConfig, model: torch.nn.Module, model_path: str, processor: Processor
) -> RolloutEngine:
    """The rollout engine named by ``rollout.engine``, built from the run config."""
    return engine_class(cfg.rollout.engine).from_config(cfg, model, model_path, processor)
