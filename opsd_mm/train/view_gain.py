"""The view gain of a step: how much the teacher's own view of the images helps it.

With per-role image views (``processor.teacher_view``; docs/vision-language.md) the teacher may
see what the student cannot. VA-OPD's "visual advantage" measures it per sampled token: the
teacher's log-prob with its own view minus with the student's (or ``processor.gain_view``), both
in the teacher context (``opsd_mm.loss.view_gain``). Every ``logging.view_gain_every`` steps it
is logged (``view_gain/*``); with ``loss.view_weighting=va_opd`` it is computed every step and
weights each token's loss as VA-OPD does.

Two moments of the step use it, hence a small class between them: after pairing,
:meth:`ViewGain.prompts` renders each example's teacher context in the student's view; inside
the step's vision cache, before the loss, :meth:`ViewGain.factors` runs the two teacher forwards
per micro-batch and returns the loss factors. The step's metrics are left in
:attr:`ViewGain.metrics`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from opsd_mm.config import RunConfig
from opsd_mm.loss.divergences import loss_mask
from opsd_mm.loss.view_gain import (
    gain_metrics,
    gain_sums,
    teacher_view_logprobs,
    token_multipliers,
    va_opd_coefficients,
)
from opsd_mm.rollout.prefetch import RolloutBatch
from opsd_mm.teacher.weights import Teacher
from opsd_mm.train.batches import Counters, PairedStep, StepPlan
from opsd_mm.types import Pair, Processor, Prompt

log = logging.getLogger(__name__)


class ViewGain:
    """The view gain's two parts of a step, and its metrics (``view_gain/*``, empty on a step
    that does not compute it)."""

    def __init__(
        self, cfg: RunConfig, processor: Processor, counters: Counters, accelerator: Any
    ) -> None:
        self.cfg, self.processor, self.counters, self.accelerator = (
            cfg,
            processor,
            counters,
            accelerator,
        )
        self.metrics: dict[str, float] = {}

    def due(self, step: int) -> bool:
        """Computed at trainer step ``step`` (1-based): every step for
        ``loss.view_weighting``, else every ``logging.view_gain_every`` steps."""
        every = self.cfg.logging.view_gain_every
        return self.cfg.loss.view_weighting != "none" or bool(every and step % every == 0)

    def prompts(
        self, step: int, batch: RolloutBatch, paired: PairedStep
    ) -> dict[int, Prompt] | None:
        """When the gain is due at ``step``: each example's teacher context in the student's
        view (the pixels of the student prompt its rollouts were sampled from; or
        ``processor.gain_view``), keyed by ``id`` of that student prompt, which all its pairs
        share; None when not due. An example whose prompt cannot be built is left out of the
        step (its pairs removed from ``paired``; counted as ``skipped/run/view_gain_prompt``)."""
        self.metrics = {}
        if not self.due(step):
            return None
        out: dict[int, Prompt] = {}
        paired_ids = {id(p.student) for p in paired.pairs}
        for ex, prompt in zip(batch.examples, batch.prompts):
            if id(prompt) not in paired_ids:  # skipped while pairing (and counted there)
                continue
            try:
                seed = prompt.meta.get("view_seed")
                out[id(prompt)] = self.processor.gain_prompt(ex, seed=seed)
            except ValueError as e:
                self.counters.raise_if_policy(e)
                self.counters.skip_example(e, "view_gain_prompt")
                log.warning("skipped example: %s", e)
        keep = [i for i, p in enumerate(paired.pairs) if id(p.student) in out]
        paired.pairs = [paired.pairs[i] for i in keep]
        paired.advantages = [paired.advantages[i] for i in keep]
        return out

    def factors(
        self,
        plan: StepPlan,
        in_student_view: dict[int, Prompt],
        model: torch.nn.Module,
        teacher: Teacher,
        packed: bool,
        timer: Any,
    ) -> dict[int, torch.Tensor]:
        """The per-token view gain of every pair of the plan (two teacher forwards per
        micro-batch, inside the step's vision cache), its metrics (summed over processes), and
        with ``loss.view_weighting=va_opd`` the factor on each token's loss, keyed by ``id`` of
        the pair ({} without the weighting)."""
        cfg, acc = self.cfg, self.accelerator
        pairs, gains = [], []
        with timer.phase("view_gain"):
            for mb in plan.micro:
                # A padding micro-batch runs too (its gains unused): under FSDP2 every process
                # must run as many forwards as the busiest, as in the loss's loop.
                rows = [
                    Pair(p.example_id, in_student_view[id(p.student)], p.teacher, p.completion_ids)
                    for p in mb.pairs
                ]
                batch = self.processor.collate(rows).to(acc.device)
                mask_BC = loss_mask(batch.completion_mask_BC, cfg.loss.skip_first_tokens)
                with acc.autocast():
                    own_N, student_view_N = teacher_view_logprobs(
                        batch, model, teacher, mask_BC, packed
                    )
                if mb.padding:
                    continue
                gain_N = (own_N - student_view_N).cpu()
                pairs += mb.pairs
                gains += list(gain_N.split(mask_BC.sum(1).tolist()))
        groups = [id(p.student) for p in pairs]
        prompts = len({g for g, gain in zip(groups, gains) if gain.numel()})
        sums = torch.cat([gain_sums(gains), torch.tensor([float(prompts)], dtype=torch.float64)])
        sums = acc.reduce(sums.to(acc.device), "sum").cpu()
        self.metrics = gain_metrics(sums[:3])
        if cfg.loss.view_weighting == "none":
            return {}
        lo = cfg.loss
        coeffs, va_metrics = va_opd_coefficients(
            gains, groups, lo.va_temperature, lo.va_high_fraction, lo.va_high_weight
        )
        self.metrics.update(va_metrics)
        factors = token_multipliers(coeffs, plan.tokens_global, float(sums[3]))
        return {id(p): f for p, f in zip(pairs, factors)}
