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
in by ``cli.py``, and so is ``build_processor`` for the model teachers' own processors.

Model teachers (``teacher.kind=model``, ``teachers``; :func:`build_model_teachers`): every
teacher's vocabulary is checked against the student's before any weights load (the student's
included), then the student loads, then each teacher (frozen), or the client of its server.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from opsd_mm.config import RunConfig, resolve_config, teacher_key, teacher_specs
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
from opsd_mm.teacher.model import ModelTeacher, load_teacher_weights, model_config
from opsd_mm.teacher.vocab import VocabInfo, check_same_vocabulary
from opsd_mm.train.distributed import check_distributed_support, make_accelerator
from opsd_mm.train.state import check_resumable
from opsd_mm.train.trainer import Trainer
from opsd_mm.types import Example, Processor

log = logging.getLogger(__name__)

# cli.py's processors.build_processor: (ProcessorConfig, model path, model_type) -> Processor.
BuildProcessor = Callable[[Any, str, str], Processor]


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
    build_processor: BuildProcessor | None = None,
) -> Trainer:
    """Model, engine and trainer for a processor and examples the caller holds.

    ``model_path``: where the model lives (default: ``model.name_or_path`` resolved,
    ``tiny:`` models built on first use). ``accelerator``: the run's one Accelerator (default:
    made here from the config). The caller sets the seed (:func:`set_seed`) before this when
    it wants the LoRA initialisation reproducible, as :func:`trainer_from_config` does.
    ``build_processor``: builds a model teacher's own processor (``processors.build_processor``,
    handed in by cli.py or the demo); required when the config has one.
    """
    cfg = resolve_config(cfg)
    accelerator = accelerator or make_accelerator(cfg)
    check_distributed_support(cfg, accelerator)  # before the model loads
    if cfg.trainer.resume:
        check_resumable(cfg.run_dir)  # every state.json unusable: say so before the model loads
    path = model_path or resolve_model_path(cfg.model)
    checked = check_teachers(cfg, path, build_processor)  # before any weights load
    model = load_trainable_model(cfg, path, accelerator.device)
    model_teachers = build_model_teachers(cfg, checked, accelerator.device)
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
        model_teachers=model_teachers,
    )


def trainer_from_config(
    cfg: RunConfig,
    wiring: DataWiring,
    accelerator: Any = None,
    reward: Any = None,
    build_processor: BuildProcessor | None = None,
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
        build_processor=build_processor,
    )


# ----------------------------------------------------------------------------- model teachers


@dataclasses.dataclass
class CheckedTeacher:
    """A model teacher whose vocabulary matched the student's: where it lives, its own
    processor, and the two vocabularies' sizes. No weights loaded yet."""

    name: str
    path: str
    processor: Processor
    vocab: VocabInfo


def check_teachers(
    cfg: RunConfig, student_path: str, build_processor: BuildProcessor | None
) -> list[CheckedTeacher]:
    """Every model teacher of the config resolved (``tiny:`` teachers built on first use), its
    vocabulary checked against the student's (``opsd_mm.teacher.vocab``: tokenizer files and
    config.json only) and its own processor built; before any weights load. None with
    ``loss.distill_weight=0`` (plain GRPO never runs a teacher: none is loaded)."""
    specs = {n: s for n, s in teacher_specs(cfg).items() if s.kind == "model"}
    if not specs:
        return []
    if cfg.loss.distill_weight == 0:
        log.warning("loss.distill_weight=0: the model teacher(s) %s are not loaded", list(specs))
        return []
    if build_processor is None:
        raise ValueError(
            "a model teacher needs build_processor (processors.build_processor) to build its "
            "own processor: pass it to trainer_from_config / trainer_from_examples"
        )
    from opsd_mm.model.load import model_type_of

    m = cfg.model
    student_opts = {"revision": m.revision, "trust_remote_code": m.trust_remote_code}
    out = []
    for name, spec in specs.items():
        key = f"{teacher_key(cfg, name)}.model.name_or_path"
        tm = spec.model
        path = resolve_model_path(model_config(spec, cfg), key)
        opts = {"revision": tm.revision, "trust_remote_code": tm.trust_remote_code}
        vocab = check_same_vocabulary(
            student_path, path, key, student_options=student_opts, teacher_options=opts
        )
        model_type = model_type_of(path, tm.revision, tm.trust_remote_code)
        # Its own family's processor (kind auto): its chat template, thinking, images.
        proc_cfg = dataclasses.replace(cfg.processor, kind="auto")
        out.append(CheckedTeacher(name, path, build_processor(proc_cfg, path, model_type), vocab))
    return out


def build_model_teachers(
    cfg: RunConfig, checked: Sequence[CheckedTeacher], device: Any
) -> dict[str, ModelTeacher]:
    """The checked model teachers, by name: loaded frozen (``scoring=local``), or the client of
    their server (``scoring=server``: a :class:`~opsd_mm.rollout.client.ServerEngine` used for
    ``score`` only; its weights are the server's)."""
    specs = teacher_specs(cfg)
    out = {}
    for c in checked:
        spec = specs[c.name]
        if spec.scoring == "server":
            out[c.name] = ModelTeacher(
                c.name, spec, c.processor, c.vocab, engine=teacher_server(cfg, spec, c)
            )
        else:
            model = load_teacher_weights(c.path, spec, cfg, device)
            out[c.name] = ModelTeacher(c.name, spec, c.processor, c.vocab, model=model)
    return out


def teacher_server(cfg: RunConfig, spec: Any, checked: CheckedTeacher) -> Any:
    """The client of a model teacher's own ``opsd-mm serve`` (at its ``server_url``), with the
    generation server's token, timeout and retries; never synced (its weights are the
    server's checkpoint, which must be the teacher's)."""
    from pathlib import Path

    from opsd_mm.rollout.client import ServerEngine

    r = cfg.rollout
    return ServerEngine(
        spec.server_url,
        Path(cfg.run_dir) / "teacher_server" / checked.name,  # never written: no sync
        eos_token_ids=checked.processor.eos_token_ids,
        token=r.server_token,
        timeout_s=r.server_timeout_s,
        retries=r.server_retries,
    )
