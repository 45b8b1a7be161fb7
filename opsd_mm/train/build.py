"""One set-up path: config -> model, processor, data, engine, trainer.

Why one: ``opsd-mm train``, the demo and the tests must build the same run from the same
config, in the same order (the seed is set before the LoRA weights are drawn), with one
Accelerator. Two entry points share the steps:

- :func:`trainer_from_config`: everything from the config alone (``opsd-mm train``): the data
  as ``opsd-mm data inspect`` shows it, then the model, engine and trainer.
- :func:`trainer_from_examples`: a processor and in-memory examples the caller already has
  (the demo's synthetic tasks, tests), then the same model, engine and trainer.

The config is resolved and the Accelerator made here, once (:func:`trainer_from_examples`,
which :func:`trainer_from_config` calls with the Accelerator it made first); the
:class:`~opsd_mm.train.trainer.Trainer` is handed both. The engine comes from the table of
engines (``opsd_mm.rollout.base``). Like the rest of the core this module imports no processor: the processor (or, for
:func:`trainer_from_config`, a :class:`~opsd_mm.data.cli.DataWiring` that builds it) is handed
in by ``cli.py``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from opsd_mm.config import RunConfig, resolve_config
from opsd_mm.data.cli import DataWiring, load_training_data
from opsd_mm.data.presets import resolve_data
from opsd_mm.model.load import (
    check_model_family,
    load_model,
    model_type_of,
    resolve_model_path,
    setup_trainable,
)
from opsd_mm.rollout.base import build_engine
from opsd_mm.train.distributed import check_distributed_support, make_accelerator
from opsd_mm.train.trainer import Trainer
from opsd_mm.types import Example, Processor


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def load_trainable_model(
    cfg: RunConfig, model_path: str, device: torch.device | str = "cpu"
) -> torch.nn.Module:
    """The model to train: its config.json read and checked against the run's config
    (:func:`~opsd_mm.model.load.check_model_family`) before any weight loads, then the weights,
    then LoRA or full fine-tuning (``model.*``)."""
    m = cfg.model
    check_model_family(cfg, model_type_of(model_path, m.revision, m.trust_remote_code))
    return setup_trainable(load_model(model_path, m, device), m)


def trainer_from_examples(
    cfg: RunConfig,
    processor: Processor,
    examples: Sequence[Example],
    *,
    model_path: str | None = None,
    accelerator: Any = None,
    load_skips: dict[str, int] | None = None,
    reward: Any = None,
) -> Trainer:
    """Model, engine and trainer for a processor and examples the caller holds.

    ``model_path``: where the model lives (default: ``model.name_or_path`` resolved,
    ``tiny:`` models built on first use). ``accelerator``: the run's one Accelerator (default:
    made here from the config). The caller sets the seed (:func:`set_seed`) before this when
    it wants the LoRA initialisation reproducible, as :func:`trainer_from_config` does.
    """
    cfg = resolve_config(cfg)
    accelerator = accelerator or make_accelerator(cfg)
    check_distributed_support(cfg, accelerator)  # before the model loads
    path = model_path or resolve_model_path(cfg.model)
    model = load_trainable_model(cfg, path, accelerator.device)
    engine = build_engine(cfg, model, path, processor)
    return Trainer(
        cfg,
        model=model,
        processor=processor,
        engine=engine,
        examples=examples,
        accelerator=accelerator,
        load_skips=load_skips,
        reward=reward,
    )


def trainer_from_config(
    cfg: RunConfig, wiring: DataWiring, accelerator: Any = None, reward: Any = None
) -> Trainer:
    """Everything a run needs, from the config alone: the preset's split and teacher template
    resolved, the seed set, the data loaded and checked (its errors - missing images, splits,
    columns - come before the model loads), then :func:`trainer_from_examples`."""
    cfg = resolve_data(cfg)
    set_seed(cfg.seed)
    accelerator = accelerator or make_accelerator(cfg)
    examples, report, processor = load_training_data(cfg, wiring)
    return trainer_from_examples(
        cfg,
        processor,
        examples,
        accelerator=accelerator,
        load_skips=report.reasons(),
        reward=reward,
    )
