"""The run's teachers, by name, and which one scores each example.

One trainer covers self-distillation (the student's own weights in the privileged context),
distillation from another model (``teacher.kind=model``) and several teachers at once (the
``teachers`` mapping, each example routed by a data column, ``teacher.route_by``). The trainer
sees them through :class:`Teachers`:

- :meth:`Teachers.route`: the name of an example's teacher, from ``Example.meta[route_by]``
  (through ``teacher.routes``; else ``teacher.route_default``; else an
  :class:`UnroutedExample`, skipped and counted as ``skipped/run/unrouted``, or raised, by
  ``teacher.unrouted_policy``). Routed when the example is drawn, so an unrouted example costs
  no rollout.
- :meth:`Teachers.teacher_prompt`: the teacher context as that teacher renders it (a model
  teacher with its own processor: its chat template, thinking mode and image processing).
- :meth:`Teachers.score_on_servers`: the pairs of server-scored teachers, one request per
  teacher.
- :meth:`Teachers.collate`: a micro-batch (one teacher's rows) laid out with the student's
  processor for the student side and the teacher's for the teacher side.
- :meth:`Teachers.forward`: the :class:`~opsd_mm.teacher.forward.TeacherForward` of a
  micro-batch, timed and measured for the step's per-teacher metrics.

Micro-batches hold one teacher's rows each (``opsd_mm.train.batches``), so a fused loss uses
one teacher head and every process runs the same teachers in the same order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from opsd_mm.config import RunConfig, teacher_specs
from opsd_mm.errors import UserError
from opsd_mm.teacher.forward import PaddingForward, TeacherForward, TeacherOutputs
from opsd_mm.teacher.model import ModelTeacher
from opsd_mm.teacher.scoring import score_pairs
from opsd_mm.teacher.weights import Teacher
from opsd_mm.types import Example, Pair, PairBatch, Processor

log = logging.getLogger(__name__)

GIB = 2**30


class UnroutedExample(UserError):
    """An example whose ``teacher.route_by`` value names no teacher (and no
    ``teacher.route_default``). Skipped and counted as ``skipped/run/unrouted`` under
    ``teacher.unrouted_policy=skip``; ``fatal`` under ``raise``, which stops the run."""

    kind = "routing error"
    skip_reason = "unrouted"

    def __init__(self, message: str, fatal: bool) -> None:
        super().__init__(message)
        self.fatal = fatal


def route(cfg: RunConfig, ex: Example) -> str:
    """The name of ``ex``'s teacher: the one teacher without a ``teachers`` mapping; else the
    teacher its ``teacher.route_by`` value names (through ``teacher.routes``), or
    ``teacher.route_default``; else an :class:`UnroutedExample`."""
    names = sorted(teacher_specs(cfg))
    if not cfg.teachers:
        return names[0]
    te = cfg.teacher
    value = ex.meta.get(te.route_by)
    if value is not None:
        name = te.routes.get(str(value), str(value))
        if name in cfg.teachers:
            return name
    if te.route_default is not None:
        return te.route_default
    shown = "no value" if value is None else f"value {str(value)!r}"
    fatal = te.unrouted_policy == "raise"
    what = (
        "set teacher.route_default, or teacher.unrouted_policy=skip to skip (and count) such "
        "examples"
        if fatal
        else "skipped (teacher.route_default would send it to a teacher)"
    )
    raise UnroutedExample(
        f"example '{ex.id}': teacher.route_by={te.route_by} has {shown}, which names no "
        f"teacher ({', '.join(names)}; teacher.routes maps values to them); {what}",
        fatal=fatal,
    )


@dataclasses.dataclass
class TeacherStats:
    """One teacher's share of a step: micro-batches, rows and loss tokens it scored, the sum of
    its per-token divergences, its forward time, and the largest outputs it handed the loss."""

    micro_batches: int = 0
    rows: int = 0
    tokens: int = 0
    divergence_sum: float = 0.0
    seconds: float = 0.0
    outputs_bytes: int = 0


class _Measured:
    """A teacher's forward, timed (synchronised on CUDA) and its outputs measured."""

    def __init__(self, inner: TeacherForward, stats: TeacherStats) -> None:
        self.inner, self.stats = inner, stats

    def completion_outputs(
        self,
        batch: PairBatch,
        student: torch.nn.Module,
        fused: bool,
        packed: bool,
        mask_BC: torch.Tensor,
    ) -> TeacherOutputs:
        cuda = batch.completion_ids_BC.is_cuda
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = self.inner.completion_outputs(batch, student, fused, packed, mask_BC)
        if cuda:
            torch.cuda.synchronize()
        self.stats.seconds += time.perf_counter() - t0
        self.stats.outputs_bytes = max(self.stats.outputs_bytes, out.nbytes())
        return out


class Teachers:
    """The run's teachers by name (``teacher_specs``: one, named ``teacher``, without a
    ``teachers`` mapping), their route, and their per-step statistics."""

    def __init__(
        self,
        cfg: RunConfig,
        self_teacher: Teacher,
        models: dict[str, ModelTeacher],
        processor: Processor,
    ) -> None:
        """``self_teacher``: the student's own weights as teacher (used by a ``self`` entry);
        ``models``: every model teacher of the config, built by ``opsd_mm.train.build``;
        ``processor``: the student's (it renders the self teacher's context)."""
        self.cfg = cfg
        self.specs = teacher_specs(cfg)
        self.names: list[str] = sorted(self.specs)  # one order on every process
        missing = [n for n, s in self.specs.items() if s.kind == "model" and n not in models]
        if missing and cfg.loss.distill_weight > 0:  # plain GRPO never runs a teacher
            raise UserError(
                f"teacher(s) {', '.join(missing)}: model teachers are loaded by the set-up "
                "(opsd_mm.train.build.trainer_from_config / trainer_from_examples)"
            )
        self.self_teacher = self_teacher
        self.models = models
        self.processor = processor
        self.route_by = cfg.teacher.route_by if cfg.teachers else None
        self.stats: dict[str, TeacherStats] = {n: TeacherStats() for n in self.names}

    # ------------------------------------------------------------------ which teacher

    @property
    def routed(self) -> bool:
        return self.route_by is not None

    @property
    def reports(self) -> bool:
        """Whether per-teacher metrics are worth a row's keys: several teachers, or another
        model as the teacher."""
        return len(self.names) > 1 or bool(self.models)

    def route(self, ex: Example) -> str:
        """The name of ``ex``'s teacher (:func:`route`)."""
        return route(self.cfg, ex)

    def processor_of(self, name: str) -> Processor:
        """The processor that renders teacher ``name``'s context."""
        return self.models[name].processor if name in self.models else self.processor

    def on_server(self, name: str) -> bool:
        """Whether teacher ``name`` is scored on a server (before the micro-batches)."""
        if self.specs[name].kind == "model":
            return name in self.models and self.models[name].on_server
        return self.cfg.teacher.scoring == "server"

    def uses_student(self, name: str) -> bool:
        """Whether teacher ``name`` is the student's own weights (or, under
        ``loss.distill_weight=0``, a model teacher that was never loaded: its rows are laid out
        by the student's processor alone)."""
        return name not in self.models

    # ------------------------------------------------------------------ the step

    def teacher_prompt(self, name: str, ex: Example) -> Any:
        """Teacher ``name``'s context for ``ex``, rendered by its own processor."""
        return self.processor_of(name).teacher_prompt(ex)

    def score_on_servers(
        self, pairs: Sequence[Pair], top_k: int, rollout_engine: Any, teacher_of: Any
    ) -> None:
        """Score the pairs of every server-scored teacher, one request per teacher: the
        student's own weights on the generation server (``rollout_engine``), a model teacher
        on its own server. ``teacher_of(pair)`` names a pair's teacher."""
        for name in self.names:
            group = [p for p in pairs if teacher_of(p) == name]
            if not group or not self.on_server(name):
                continue
            if name in self.models:
                self.models[name].score(group, top_k)
            else:
                score_pairs(rollout_engine, group, top_k)

    def collate(self, name: str, pairs: Sequence[Pair], foreign: bool = False) -> PairBatch:
        """Micro-batch ``pairs`` of teacher ``name`` laid out as ``opsd_mm.types`` says. The
        student's own weights: the student's processor lays out both sides, as it rendered
        both. A model teacher: the student side by the student's processor, the teacher side by
        the teacher's (its pad id, its image-token rules), with the same completion width; a
        server-scored teacher, or ``foreign`` rows (a padding micro-batch of another teacher's
        rows), need no teacher side, and get the student's in its place."""
        if self.uses_student(name) and not foreign:
            return self.processor.collate(pairs)
        batch = self.processor.collate([dataclasses.replace(p, teacher=p.student) for p in pairs])
        if foreign or self.models[name].on_server:
            return batch
        teacher = self.models[name].processor.collate(
            [dataclasses.replace(p, student=p.teacher) for p in pairs]
        )
        if teacher.completion_ids_BC.shape != batch.completion_ids_BC.shape:
            raise RuntimeError(
                f"teacher '{name}': its layout has {tuple(teacher.completion_ids_BC.shape)} "
                f"completion columns, the student's {tuple(batch.completion_ids_BC.shape)}"
            )
        return dataclasses.replace(batch, teacher=teacher.teacher)

    def forward(self, name: str, foreign: bool = False) -> TeacherForward:
        """The forward of teacher ``name`` for one micro-batch, measured into the step's
        statistics. ``foreign``: a padding micro-batch of another teacher's rows
        (:class:`~opsd_mm.teacher.forward.PaddingForward`): the teacher runs only where its
        forward is collective (the student's own weights or a sharded teacher under FSDP2)."""
        inner: TeacherForward = self.models.get(name) or self.self_teacher
        if foreign:
            model = self.models.get(name)
            collective = model.sharded if model is not None else self._student_sharded
            vl = model.vl if model is not None else self._student_vl
            inner = PaddingForward(
                inner if not self.on_server(name) else None,
                collective,
                vl,
                self.processor.eos_token_ids[0],
            )
        return _Measured(inner, self.stats[name])

    def prepare(self, accelerator: Any, student: torch.nn.Module) -> None:
        """After the student is prepared: each model teacher placed (sharded under FSDP2), and
        what padding forwards need to know about the student."""
        from accelerate.utils import DistributedType

        self._student_sharded = accelerator.distributed_type == DistributedType.FSDP
        self._student_vl = getattr(student.config, "vision_config", None) is not None
        for teacher in self.models.values():
            teacher.prepare(accelerator)

    def step_context(self) -> contextlib.AbstractContextManager:
        """Every local model teacher's processor step context on its own model (VL: each
        teacher's own vision cache), for one step's forwards."""
        stack = contextlib.ExitStack()
        for teacher in self.models.values():
            stack.enter_context(teacher.step_context())
        return stack

    # ------------------------------------------------------------------ metrics

    def record(self, name: str, rows: int, div_N: torch.Tensor) -> None:
        """One real (not padding) micro-batch of teacher ``name``: its rows and per-token
        divergences (NaN where there is none, as under ``loss.distill_weight=0``)."""
        s = self.stats[name]
        s.micro_batches += 1
        s.rows += rows
        s.tokens += int(div_N.numel())
        finite = div_N[torch.isfinite(div_N)]
        s.divergence_sum += float(finite.float().sum()) if finite.numel() else 0.0

    def step_metrics(self) -> dict[str, float]:
        """This process's per-teacher metrics of the step, and the statistics reset: for each
        teacher ``teacher/NAME/rows``, ``/loss_tokens``, ``/divergence_mean``, ``/time_s``; the
        memory of the teacher forwards (``memory/teacher_weights_gib``: the model teachers'
        weights this process holds, its shard under FSDP2; ``memory/teacher_outputs_gib``: the
        largest outputs a teacher forward handed the loss). Empty for a run with the student's
        own weights as its one teacher (its metrics are the step's)."""
        out: dict[str, float] = {}
        if self.reports:
            for name in self.names:
                s = self.stats[name]
                out[f"teacher/{name}/rows"] = s.rows
                out[f"teacher/{name}/loss_tokens"] = s.tokens
                out[f"teacher/{name}/divergence_mean"] = (
                    s.divergence_sum / s.tokens if s.tokens else float("nan")
                )
                out[f"teacher/{name}/time_s"] = s.seconds
            weights = sum(t.weight_bytes() for t in self.models.values())
            for v in self.self_teacher.weights.values():  # the swapped-in copies
                local = v.to_local() if hasattr(v, "to_local") else v
                weights += local.numel() * local.element_size()
            out["memory/teacher_weights_gib"] = weights / GIB
            out["memory/teacher_outputs_gib"] = (
                max(s.outputs_bytes for s in self.stats.values()) / GIB
            )
        self.stats = {n: TeacherStats() for n in self.names}
        return out
