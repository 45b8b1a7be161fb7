"""Teachers: which weights score the student's completion in the teacher context.

- ``fixed``: the initial model. Under LoRA that is the base with the adapter disabled (no copy
  needed, since LoRA's B matrices start at zero); under full fine-tuning the initial values of
  the trainable parameters, swapped into the student for the teacher forward.
- ``live``: the current weights.
- ``ema``: an exponential moving average of the trainable parameters,
  ``ema <- decay * ema + (1 - decay) * current`` every ``update_every`` optimizer steps, swapped
  in the same way.

Why swap rather than keep a second model: a frozen copy of the whole model would also copy
what never trains (a frozen vision tower and projector, anything with ``requires_grad=False``),
which the student already holds and the teacher would read unchanged. Keeping only the
trainable parameters' teacher values and exchanging them with the student's in place, around
the teacher forward, shares every frozen module by construction, under one process, DDP and
FSDP2 alike. A fixed teacher is thus an EMA that is never updated: one code path. The
exchange is a swap (two in-place copies per tensor and one parameter's worth of scratch), so
the teacher costs one copy of the trainable parameters and nothing transient beyond the
largest single parameter. The copies are not checkpointed for a fixed teacher: the trainer
builds the teacher from the initial weights before it loads a checkpoint, so a resumed run
rebuilds the same ones (the EMA's are checkpointed, as they move).

Under FSDP2 the teacher tensors are DTensors of the parameters' placement (taken by
:meth:`Teacher.follow_sharding` once the model is sharded), so each process keeps, averages and
swaps its own shard. The swap writes into the sharded parameters, so every FSDP unit is
resharded around it: an unsharded copy left from an earlier forward (FSDP2 keeps the root's)
would otherwise hide the swap.

Every teacher forward runs under ``torch.no_grad``; callers enter ``as_teacher`` inside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from opsd_mm.config import TeacherConfig
from opsd_mm.model.forward import completion_hidden, completion_logits
from opsd_mm.teacher.forward import TeacherOutputs
from opsd_mm.types import PairBatch


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _reshard(model: torch.nn.Module) -> None:
    """Free every FSDP2 unit's gathered parameters (no-op for other modules), so the registered
    parameters are the sharded ones and the next forward gathers them afresh."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@torch.no_grad()
def _swap(params: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Exchange the contents of ``params[n]`` and ``values[n]`` in place, one tensor at a time
    (scratch: one tensor). In place, so FSDP2's sharded storage and DDP's and the optimizer's
    references to the parameters stay valid. Exact: two swaps restore both sides bit for bit."""
    for n, v in values.items():
        p = params[n]
        scratch = p.detach().clone()
        p.copy_(v)
        v.copy_(scratch)


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module in eval mode (no dropout), each restored to its own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class Teacher:
    """Gives the module to run as teacher, and keeps the teacher's values of the trainable
    parameters when it needs its own (``fixed`` under full fine-tuning, ``ema``)."""

    def __init__(self, cfg: TeacherConfig, model: torch.nn.Module) -> None:
        """Build from ``model`` holding the initial weights (before any checkpoint loads)."""
        self.cfg = cfg
        # The teacher's values of the student's trainable parameters, by parameter name.
        self.weights: dict[str, torch.Tensor] = {}
        if cfg.kind == "ema" or (cfg.kind == "fixed" and not _is_peft(model)):
            self.weights = {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
            }

    @property
    def ema(self) -> dict[str, torch.Tensor]:
        """The EMA tensors (empty unless ``ema``): the teacher state a checkpoint holds."""
        return self.weights if self.cfg.kind == "ema" else {}

    def follow_sharding(self, model: torch.nn.Module) -> None:
        """After FSDP2 sharded ``model``: re-take the teacher tensors from the sharded
        parameters (they still hold the initial weights), so they share their placement."""
        if self.weights:
            params = dict(model.named_parameters())
            self.weights = {n: params[n].detach().clone() for n in self.weights}

    @contextmanager
    def as_teacher(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Yield the module that acts as teacher; restore the student afterwards. A fixed
        teacher runs in eval mode (it is the initial model, not a training one)."""
        if self.cfg.kind == "live":
            yield model
        elif self.cfg.kind == "fixed" and not self.weights:
            with model.disable_adapter():
                yield model
        else:
            _reshard(model)
            params = dict(model.named_parameters())
            _swap(params, self.weights)
            try:
                if self.cfg.kind == "fixed":
                    with _eval_mode(model):
                        yield model
                else:
                    yield model
            finally:
                _reshard(model)
                _swap(params, self.weights)

    def completion_outputs(
        self,
        batch: PairBatch,
        student: torch.nn.Module,
        fused: bool,
        packed: bool,
        mask_BC: torch.Tensor,
    ) -> TeacherOutputs:
        """The teacher at the loss tokens (``opsd_mm.teacher.forward.TeacherForward``): the
        student's module as teacher (:meth:`as_teacher`) on ``batch.teacher``; hidden states
        and head (fused) or logits (naive). Under the caller's ``torch.no_grad``."""
        width_C = batch.completion_ids_BC.shape[1]
        with self.as_teacher(student) as teacher_model:
            if fused:
                hidden_NH, head = completion_hidden(
                    teacher_model, batch.teacher, width_C, mask_BC, packed
                )
                return TeacherOutputs(
                    hidden_NH, self.head_weight(head.weight), self.head_weight(head.bias)
                )
            logits_NV = completion_logits(teacher_model, batch.teacher, width_C, mask_BC, packed)
            return TeacherOutputs(logits_NV=logits_NV)

    def head_weight(self, param: torch.Tensor | None) -> torch.Tensor | None:
        """A teacher head parameter (lm_head weight or bias, taken inside :meth:`as_teacher`) as
        it may be used after the block exits. A swapped (trainable) parameter returns to the
        student's values when the block exits, so it is copied; a sharded (FSDP2) one is
        gathered whole (a new tensor either way); any other (the LoRA base's, the live
        weights') is shared. None stays None."""
        if param is None:
            return None
        if hasattr(param, "full_tensor"):  # a DTensor shard
            return param.full_tensor()  # collective: every process runs each teacher forward
        if self.weights and param.requires_grad:
            return param.detach().clone()
        return param

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Call after each optimizer step (``step`` counts completed steps, from 1)."""
        if self.cfg.kind != "ema" or step % self.cfg.ema_update_every != 0:
            return
        decay = self.cfg.ema_decay
        params = dict(model.named_parameters())
        for n, v in self.weights.items():
            v.mul_(decay).add_(params[n].detach(), alpha=1 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA tensors; nothing for the other kinds (a fixed teacher's are the initial
        weights, rebuilt at start)."""
        return {k: v.contiguous() for k, v in self.ema.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, v in state.items():
            if n not in self.ema:
                raise KeyError(f"teacher checkpoint has unknown EMA parameter '{n}'")
            self.ema[n].copy_(v)
