"""The loss of one micro-batch: teacher forward, student forward, per-token divergence.

Why one entry point: the trainer should not know which path computes the loss. Here the
``loss.fused`` choice is made (the fused, chunked path from hidden states and the lm_head
weight, ``opsd_mm.loss.fused``; or the naive reference on materialised logits,
``opsd_mm.loss.divergences``). The teacher is whatever runs the micro-batch's teacher forward
(``opsd_mm.teacher.forward.TeacherForward``: the student's own weights swapped in, or a separate
model) and hands over its hidden states and head, or its logits. The trainer calls
:func:`micro_batch_loss` once per micro-batch, inside its autocast.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import torch

from opsd_mm.config import LossConfig
from opsd_mm.loss.divergences import DivergenceOut, loss_mask, loss_temperature, token_divergence
from opsd_mm.loss.importance import weighted_loss_sum
from opsd_mm.loss.policy_gradient import pg_loss_N, sampled_logprob, sampled_logprob_fused
from opsd_mm.model.forward import completion_hidden, completion_logits, unwrap
from opsd_mm.teacher.forward import TeacherForward
from opsd_mm.types import PairBatch, TeacherLogprobs


class PhaseTimer(Protocol):
    """Times named phases (the trainer's ``opsd_mm.train.metrics.PhaseTimer``): the loss
    reports its ``teacher`` and ``student`` phases through it."""

    def phase(self, name: str) -> AbstractContextManager: ...


def _phase(timer: PhaseTimer | None, name: str) -> AbstractContextManager:
    return timer.phase(name) if timer is not None else nullcontext()


def micro_batch_loss(
    batch: PairBatch,
    model: torch.nn.Module,
    teacher: TeacherForward,
    scale: float,
    cfg: LossConfig,
    timer: PhaseTimer | None = None,
    rollout_logprob_N: torch.Tensor | None = None,
    advantage_B: torch.Tensor | None = None,
    packed: bool = False,
    teacher_logprobs: TeacherLogprobs | None = None,
    token_weight_N: torch.Tensor | None = None,
) -> tuple[torch.Tensor, DivergenceOut, torch.Tensor]:
    """``scale * sum_n loss_n`` over the micro-batch's loss tokens, and the per-token stats.

    The teacher scores the completion in the teacher context under ``torch.no_grad`` (phase
    ``teacher``); the student in the student context with gradients (phase ``student``). The
    loss tokens are the completion tokens minus the first ``cfg.skip_first_tokens`` of each
    row (:func:`loss_mask`); ``scale`` is the trainer's normalisation (``loss.normalize``).
    ``model`` is the (possibly accelerate-wrapped) student; the teacher runs on its unwrapped
    module, as :meth:`Teacher.as_teacher` swaps weights on it. ``rollout_logprob_N``: the
    rollout engine's log-probs of the loss tokens, for ``loss.importance_clip``
    (``opsd_mm.loss.importance``); the per-token losses are then weighted by the truncated ratios.

    With ``loss.reward_weight`` > 0 the loss is ``distill_weight * divergence + reward_weight *
    (-A log p_s(y))``, both per token, summed and times ``scale`` (``opsd_mm.loss.policy_gradient``);
    ``advantage_B`` holds each row's group-normalised advantage A. The third value is the two
    weighted terms, detached, [2] (distillation, policy gradient). ``packed``: both forwards
    run padding-free, the micro-batch's rows packed into one sequence (``opsd_mm.model.packing``).
    ``teacher_logprobs``: the teacher already scored on the generation server
    (``teacher.scoring=server``), for the N loss tokens in ``completion_ids_BC[mask_BC]`` order;
    the teacher forward is then skipped and the loss reads these instead.
    ``token_weight_N``: fixed per-token weights on the distillation term (``loss.view_weighting``,
    ``opsd_mm.loss.view_gain``), in the same order; None: every token weighs 1.
    """
    w_d, w_r = cfg.distill_weight, cfg.reward_weight
    width_C = batch.completion_ids_BC.shape[1]
    mask_BC = loss_mask(batch.completion_mask_BC, cfg.skip_first_tokens)
    ids_N = batch.completion_ids_BC[mask_BC]
    if token_weight_N is not None:
        token_weight_N = token_weight_N.to(ids_N.device)
    if w_d == 0:  # plain GRPO: the teacher's term weighs nothing, so it is never run
        return _policy_gradient_only(
            batch, model, scale, cfg, timer, advantage_B, packed, mask_BC, ids_N
        )
    # The teacher: scored on the server already (no forward here), or a forward now.
    t_hidden_NH = t_weight_VH = t_bias_V = t_logits_NV = None
    if teacher_logprobs is not None:
        teacher_logprobs = teacher_logprobs.to(ids_N.device)
        t_logits_NV = teacher_logprobs  # token_divergence takes either
    else:
        t_hidden_NH, t_weight_VH, t_bias_V, t_logits_NV = _teacher_forward(
            batch, model, teacher, cfg, timer, packed, mask_BC
        )
    with _phase(timer, "student"):
        if cfg.fused:
            from opsd_mm.loss.fused import fused_divergence

            s_hidden_NH, s_head = completion_hidden(model, batch.student, width_C, mask_BC, packed)
            loss, out = fused_divergence(
                s_hidden_NH,
                t_hidden_NH,
                s_head.weight,
                ids_N,
                cfg,
                bias_V=s_head.bias,
                teacher_weight_VH=t_weight_VH,
                teacher_bias_V=t_bias_V,
                scale=scale,
                chunk_size=cfg.chunk_size or None,
                compile=cfg.compile,
                rollout_logprob_N=rollout_logprob_N,
                teacher_logprobs=teacher_logprobs,
                token_weight_N=token_weight_N,
            )
            if w_r > 0:
                logp_N = _fused_logprob(s_hidden_NH, s_head, ids_N, cfg)
        else:
            s_logits_NV = completion_logits(model, batch.student, width_C, mask_BC, packed)
            out = token_divergence(s_logits_NV, t_logits_NV, ids_N, cfg)
            loss_N = out.loss_N if token_weight_N is None else out.loss_N * token_weight_N
            loss = scale * weighted_loss_sum(
                loss_N, out.student_logprob_N, rollout_logprob_N, cfg.importance_clip
            )
            if w_r > 0:
                logp_N = sampled_logprob(s_logits_NV, ids_N, loss_temperature(cfg))
        if w_r == 0:  # pure OPSD: the loss exactly as without a reward path
            loss = loss if w_d == 1 else w_d * loss
            return loss, out, torch.stack([loss.detach(), torch.zeros_like(loss.detach())])
        distill = w_d * loss
        pg = _pg_term(logp_N, advantage_B, mask_BC, cfg, scale)
        return distill + pg, out, torch.stack([distill.detach(), pg.detach()]).float()


def _teacher_forward(
    batch: PairBatch,
    model: torch.nn.Module,
    teacher: TeacherForward,
    cfg: LossConfig,
    timer: PhaseTimer | None,
    packed: bool,
    mask_BC: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """The teacher's side of :func:`micro_batch_loss`, under no_grad (phase ``teacher``):
    (hidden states [N, H], head weight, head bias, None) on the fused path, (None, None, None,
    logits [N, V]) on the naive one. ``teacher`` is any ``opsd_mm.teacher.forward``
    teacher: the student's own weights swapped in, or a separate model."""
    with _phase(timer, "teacher"), torch.no_grad():
        out = teacher.completion_outputs(batch, unwrap(model), cfg.fused, packed, mask_BC)
    return out.hidden_NH, out.weight_VH, out.bias_V, out.logits_NV


def _policy_gradient_only(
    batch: PairBatch,
    model: torch.nn.Module,
    scale: float,
    cfg: LossConfig,
    timer: PhaseTimer | None,
    advantage_B: torch.Tensor | None,
    packed: bool,
    mask_BC: torch.Tensor,
    ids_N: torch.Tensor,
) -> tuple[torch.Tensor, DivergenceOut, torch.Tensor]:
    """:func:`micro_batch_loss` with ``loss.distill_weight`` 0: ``reward_weight * (-A log
    p_s(y))`` from the student forward alone. Skipping the teacher forward saves a third of the
    step's forward compute and changes nothing in the loss or its gradient (the distillation
    term would be multiplied by 0). The divergence and teacher statistics are NaN (there is no
    teacher distribution); the student's sampled-token log-probability is kept at temperature 1
    for the rollout/trainer log-prob gap."""
    width_C = batch.completion_ids_BC.shape[1]
    temperature = loss_temperature(cfg)
    with _phase(timer, "student"):
        if cfg.fused:
            s_hidden_NH, s_head = completion_hidden(model, batch.student, width_C, mask_BC, packed)
            logp_N = _fused_logprob(s_hidden_NH, s_head, ids_N, cfg)
        else:
            s_logits_NV = completion_logits(model, batch.student, width_C, mask_BC, packed)
            logp_N = sampled_logprob(s_logits_NV, ids_N, temperature)
        pg = _pg_term(logp_N, advantage_B, mask_BC, cfg, scale)
    nan_N = torch.full_like(logp_N, float("nan"), dtype=torch.float32).detach()
    out = DivergenceOut(
        loss_N=torch.zeros_like(nan_N),
        div_N=nan_N,
        clipped_N=torch.zeros_like(nan_N),
        student_entropy_N=nan_N,
        teacher_entropy_N=nan_N,
        student_logprob_N=logp_N.detach().float() if temperature == 1.0 else nan_N,
    )
    return pg, out, torch.stack([torch.zeros_like(pg.detach()), pg.detach()]).float()


def _fused_logprob(
    hidden_NH: torch.Tensor, head: torch.nn.Module, ids_N: torch.Tensor, cfg: LossConfig
) -> torch.Tensor:
    """The student's sampled-token log-probabilities from its hidden states, chunk by chunk."""
    return sampled_logprob_fused(
        hidden_NH,
        head.weight,
        ids_N,
        bias_V=head.bias,
        temperature=loss_temperature(cfg),
        chunk_size=cfg.chunk_size or 256,
    )


def _pg_term(
    logp_N: torch.Tensor,
    advantage_B: torch.Tensor | None,
    mask_BC: torch.Tensor,
    cfg: LossConfig,
    scale: float,
) -> torch.Tensor:
    """``reward_weight * scale * sum_n -A_n log p_s(y_n)``, each row's advantage spread over
    its loss tokens."""
    if advantage_B is None:
        raise ValueError("loss.reward_weight > 0 needs the rows' advantages (advantage_B)")
    adv_N = advantage_B[:, None].expand(mask_BC.shape)[mask_BC]
    return cfg.reward_weight * (pg_loss_N(logp_N, adv_N).sum() * scale)
