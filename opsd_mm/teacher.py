"""Teachers: which weights score the student's completion in the teacher context.

- ``fixed``: the initial model. Under LoRA that is the base with the adapter disabled (no copy
  needed, since LoRA's B matrices start at zero); under full fine-tuning a frozen copy.
- ``live``: the current weights.
- ``ema``: an exponential moving average of the trainable parameters,
  ``ema <- decay * ema + (1 - decay) * current`` every ``update_every`` optimizer steps. It is
  swapped into the model for the teacher forward and swapped back afterwards, so under LoRA the
  extra memory is one adapter's worth.

Under FSDP2 a frozen copy is sharded like the student, and the EMA tensors like the parameters (DTensors of the same placement,
taken by :meth:`Teacher.follow_sharding` once the model is sharded), so each process averages
its own shard. The swap writes into the sharded parameters, so every FSDP unit is resharded
around it: an unsharded copy left from an earlier forward (FSDP2 keeps the root's) would
otherwise hide the swap.

Every teacher forward runs under ``torch.no_grad``; callers enter ``as_teacher`` inside it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from opsd_mm.config import TeacherConfig


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _reshard(model: torch.nn.Module) -> None:
    """Free every FSDP2 unit's gathered parameters (no-op for other modules), so the registered
    parameters are the sharded ones and the next forward gathers them afresh."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class Teacher:
    """Gives the module to run as teacher, and keeps EMA state when asked to."""

    def __init__(self, cfg: TeacherConfig, model: torch.nn.Module) -> None:
        self.cfg = cfg
        self.frozen: torch.nn.Module | None = None
        self.ema: dict[str, torch.Tensor] = {}
        if cfg.kind == "fixed" and not _is_peft(model):
            self.frozen = copy.deepcopy(model).eval()
            for p in self.frozen.parameters():
                p.requires_grad_(False)
        if cfg.kind == "ema":
            self.ema = {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
            }

    def follow_sharding(self, model: torch.nn.Module) -> None:
        """After FSDP2 sharded ``model``: shard a frozen copy the same way (``fully_shard`` on
        the same submodules, then its root), and re-take the EMA tensors from the sharded
        parameters (they still hold the initial weights), so they share their placement."""
        if self.frozen is not None:
            from torch.distributed.fsdp import FSDPModule, fully_shard

            units = [n for n, m in model.named_modules() if n and isinstance(m, FSDPModule)]
            for name in units:
                fully_shard(self.frozen.get_submodule(name), reshard_after_forward=True)
            fully_shard(self.frozen, reshard_after_forward=True)
        if self.ema:
            params = dict(model.named_parameters())
            self.ema = {n: params[n].detach().clone() for n in self.ema}

    @contextmanager
    def as_teacher(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Yield the module that acts as teacher; restore the student afterwards."""
        if self.cfg.kind == "live":
            yield model
        elif self.cfg.kind == "fixed":
            if self.frozen is not None:
                yield self.frozen
            else:
                with model.disable_adapter():
                    yield model
        else:
            _reshard(model)
            params = dict(model.named_parameters())
            saved = {n: params[n].detach().clone() for n in self.ema}
            try:
                with torch.no_grad():
                    for n, v in self.ema.items():
                        params[n].copy_(v)
                yield model
            finally:
                _reshard(model)
                with torch.no_grad():
                    for n, v in saved.items():
                        params[n].copy_(v)

    def head_weight(self, param: torch.Tensor | None) -> torch.Tensor | None:
        """A teacher head parameter (lm_head weight or bias, taken inside :meth:`as_teacher`) as
        it may be used after the block exits. An EMA teacher's trainable parameters are swapped
        back to the student's when the block exits: such a parameter (full fine-tuning, where the
        EMA covers the head) is copied; otherwise the tensor is shared (a frozen copy, the
        LoRA base, or the live weights stay what they are); a sharded (FSDP2) frozen copy's is
        gathered whole. None stays None."""
        if param is not None and self.cfg.kind == "ema" and param.requires_grad:
            return param.detach().clone()
        if param is not None and hasattr(param, "full_tensor"):  # a sharded frozen copy's
            return param.full_tensor()  # collective: every process runs each teacher forward
        return param

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Call after each optimizer step (``step`` counts completed steps, from 1)."""
        if self.cfg.kind != "ema" or step % self.cfg.ema_update_every != 0:
            return
        decay = self.cfg.ema_decay
        params = dict(model.named_parameters())
        for n, v in self.ema.items():
            v.mul_(decay).add_(params[n].detach(), alpha=1 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.contiguous() for k, v in self.ema.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, v in state.items():
            if n not in self.ema:
                raise KeyError(f"teacher checkpoint has unknown EMA parameter '{n}'")
            self.ema[n].copy_(v)
