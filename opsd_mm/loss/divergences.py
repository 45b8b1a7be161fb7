"""Per-token divergences between the student's and the teacher's next-token distributions.

This is the naive reference: it takes materialised logits ``[N, V]`` (N selected completion
tokens, V vocabulary entries) and returns per-token values in fp32 (float64 inputs stay float64,
so ``gradcheck`` can run). The fused path (``opsd_mm.loss.fused``) calls :func:`token_divergence` on
one chunk of tokens at a time, so every mode has exactly one implementation.

What each mode computes lives in one table, ``opsd_mm.loss.modes``: this module looks the mode up
(:func:`~opsd_mm.loss.modes.mode_for`) and branches on its fields (``sampled_token_only``; its
``terms`` for the vocabulary modes), never on its name.

Reduction is kept separate on purpose: the trainer sums ``loss_N`` over every micro-batch and
divides by the *global* count of loss tokens of the optimizer step (:func:`reduce_loss`), so
gradient accumulation and data parallelism give the same gradient as one big batch.

Directions, in words (S = student, T = teacher, both at the configured temperature):

- ``forward_kl``: KL(T || S) = sum_v T_v (log T_v - log S_v), mass-covering.
- ``reverse_kl``: KL(S || T) = sum_v S_v (log S_v - log T_v), mode-seeking.
- ``jsd`` (generalized, weight beta), as defined by the GKD paper (arXiv 2306.13649, Eq. 1) and
  used by the OPSD reference code, TRL and Liger: with the mixture M = beta*T + (1-beta)*S,
  ``JSD_beta = beta * KL(T || M) + (1-beta) * KL(S || M)``. beta=0 is *exactly* KL(T || S)
  (forward) and beta=1 *exactly* KL(S || T) (reverse): both endpoints are special-cased, as the
  reference does (once, in ``opsd_mm.loss.modes.mode_for``), because the formula itself tends
  to 0 at either end (the heavily weighted KL compares a distribution with a mixture that tends
  to it, and the other term's weight vanishes). The per-token values at beta=0.1 are thus much
  smaller than at 0.5 on the same distributions; tune the learning rate with beta, as in the
  reference. At beta=0.5 it is the textbook JSD. So ``loss.beta`` means what it means in the
  paper and in TRL: a recipe's ``--beta`` carries over unchanged. (Until version 0.1 this project
  swapped the two weights to be continuous at the ends; the two agree at 0, 0.5 and 1 only.)
- ``sampled_pg``: the on-policy reverse-KL policy gradient on the sampled token y only.

Reminder for readers of other code: ``torch.nn.functional.kl_div(input, target)`` computes
KL(target || input), with ``input`` in log space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from opsd_mm.config import LossConfig
from opsd_mm.loss.modes import MODES, mode_for
from opsd_mm.types import TeacherLogprobs

DIVERGENCES = tuple(MODES)  # = LossConfig.divergence (tests/loss/test_modes.py)

# Floor for the tail bucket's probability: keeps log(tail) finite (log(1e-30) ~ -69) when the
# top-k tokens hold all the mass in floating point. The clamp has zero gradient where it binds.
_TAIL_FLOOR = 1e-30


@dataclass
class DivergenceOut:
    """Per-token results for N loss tokens.

    ``loss_N`` (fp32, differentiable w.r.t. the student logits) is what to backpropagate, after
    :func:`reduce_loss`. The rest is detached, for metrics: ``div_N`` is the unclipped divergence
    on the configured support (for ``sampled_pg`` the single-sample estimate
    ``log p_s(y) - log p_t(y)``); ``clipped_N`` the fraction of clipped terms: 0/1 under a token
    clip, the fraction of support entries under a point-wise clip, and 1 where both are set and
    the token clip binds; the entropies are those of the full-vocabulary distributions at the
    configured temperature (whatever the top-k support). ``student_logprob_N`` is the student's
    log-probability of the sampled token under the unmodified (temperature-1) distribution - what
    a rollout engine reports, for the rollout/trainer log-prob gap (NaN without sampled ids).
    """

    loss_N: torch.Tensor
    div_N: torch.Tensor
    clipped_N: torch.Tensor
    student_entropy_N: torch.Tensor
    teacher_entropy_N: torch.Tensor
    student_logprob_N: torch.Tensor


def loss_temperature(cfg: LossConfig) -> float:
    """``loss.temperature``; null (unresolved: a LossConfig built outside ``load_config`` /
    ``resolve_config``, as in tests) means 1."""
    return 1.0 if cfg.temperature is None else cfg.temperature


def loss_mask(completion_mask_BC: torch.Tensor, skip_first_tokens: int) -> torch.Tensor:
    """Bool [B, C]: the completion tokens of each row minus its first ``skip_first_tokens``.

    Counting is by position among the row's own completion tokens (a cumulative sum), so the
    result does not depend on where the completion starts in the row.
    """
    mask_BC = completion_mask_BC.bool()
    if skip_first_tokens <= 0:
        return mask_BC
    rank_BC = mask_BC.long().cumsum(dim=1)  # 1 on the first completion token, 2 on the second...
    return mask_BC & (rank_BC > skip_first_tokens)


def reduce_loss(
    loss_N: torch.Tensor, num_tokens_global: int | float | torch.Tensor
) -> torch.Tensor:
    """``sum(loss_N) / max(num_tokens_global, 1)``.

    Dividing every micro-batch by the step's global token count (not its own) makes the summed
    gradients equal to those of one batch. An empty ``loss_N`` gives exactly 0.0, still attached
    to the graph, so ``backward`` runs and gives zero (never NaN) gradients.
    """
    if torch.is_tensor(num_tokens_global):
        denom = num_tokens_global.to(loss_N.dtype).clamp(min=1)
    else:
        denom = max(float(num_tokens_global), 1.0)
    return loss_N.sum() / denom


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate across the range (Maechler's two branches).

    x is first clamped to at most -_TAIL_FLOOR, so the result stays >= log(_TAIL_FLOOR) (about
    -69) and finite, with a finite gradient, when the top-k mass rounds to 1."""
    x = x.clamp(max=-_TAIL_FLOOR)
    near_zero = x > -math.log(2.0)
    # Each branch is evaluated where it is accurate; the other branch's inputs are kept in range
    # so that neither produces inf/NaN (torch.where would propagate NaN gradients otherwise).
    a = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x)))
    return torch.where(near_zero, a, b)


def _support_log_probs(
    student_logp_NV: torch.Tensor, teacher_logp_NV: torch.Tensor, cfg: LossConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Restrict both log-distributions to the teacher's top-k support -> [N, K].

    K = V without top-k (or when k >= V, which is then exactly the full result); K = k when
    renormalised over the k tokens; K = k + 1 with the tail bucket, whose last entry is
    log(1 - sum of the k probabilities) of each distribution.
    """
    k = cfg.top_k
    if k <= 0 or k >= student_logp_NV.shape[-1]:
        return student_logp_NV, teacher_logp_NV
    idx_NK = teacher_logp_NV.topk(k, dim=-1).indices
    return topk_support(
        student_logp_NV, idx_NK, teacher_logp_NV.gather(-1, idx_NK), cfg.top_k_tail_bucket
    )


def topk_support(
    student_logp_NV: torch.Tensor,
    topk_ids_NK: torch.Tensor,
    teacher_topk_NK: torch.Tensor,
    tail_bucket: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both distributions on the teacher's top-k support, from the teacher's top-k alone.

    ``teacher_topk_NK`` are the teacher's full-vocabulary log-probabilities of ``topk_ids_NK``;
    nothing else of the teacher is needed: renormalising over the k ids divides by their mass,
    and the tail bucket is 1 minus it. So a teacher scored elsewhere (the generation server's
    top-k, ``teacher.scoring=server``) gives exactly what the full logits give, for the same ids
    and log-probabilities. The order of the ids does not matter (the divergence sums over them).
    """
    s_NK = student_logp_NV.gather(-1, topk_ids_NK.long())
    t_NK = teacher_topk_NK.to(s_NK.dtype)
    s_mass_N = torch.logsumexp(s_NK, dim=-1)
    t_mass_N = torch.logsumexp(t_NK, dim=-1)
    if not tail_bucket:
        return s_NK - s_mass_N[:, None], t_NK - t_mass_N[:, None]
    s_tail_N = _log1mexp(s_mass_N)
    t_tail_N = _log1mexp(t_mass_N)
    return torch.cat([s_NK, s_tail_N[:, None]], dim=-1), torch.cat(
        [t_NK, t_tail_N[:, None]], dim=-1
    )


def divergence_terms(
    student_logp_NK: torch.Tensor, teacher_logp_NK: torch.Tensor, divergence: str, beta: float
) -> torch.Tensor:
    """The per-entry terms [N, K] whose sum over K is the divergence: the ``terms`` of the
    mode's entry in ``opsd_mm.loss.modes`` (the JSD's endpoints resolved by ``mode_for``).

    Point-wise clipping acts on these terms, so their split matters: forward KL's term is
    T_v (log T_v - log S_v), reverse KL's S_v (log S_v - log T_v), and the JSD's
    beta T_v (log T_v - log M_v) + (1-beta) S_v (log S_v - log M_v), with log M computed as a
    log-sum-exp of the two log-distributions (as the reference and TRL compute it). A
    ValueError for a mode without vocabulary terms (``sampled_pg``).
    """
    mode = mode_for(divergence, beta)
    if mode.terms is None:
        raise ValueError(f"loss.divergence={divergence!r} has no vocabulary terms")
    return mode.terms(student_logp_NK, teacher_logp_NK, beta)


class Clips(NamedTuple):
    """What :func:`apply_clips` returns. ``loss_N`` is what to backpropagate (differentiable
    when the terms are); ``div_N`` (unclipped) and ``clipped_N`` are for metrics. ``over_NK``
    (bool, point-wise clip) and ``over_N`` (bool, token clip) are the entries and rows whose
    gradient is zero, None when that clip is off: a closed-form gradient zeroes them."""

    loss_N: torch.Tensor
    div_N: torch.Tensor
    clipped_N: torch.Tensor
    over_NK: torch.Tensor | None
    over_N: torch.Tensor | None


def apply_clips(terms_NK: torch.Tensor, cfg: LossConfig, *, in_place: bool = False) -> Clips:
    """Sum the per-entry divergence terms [N, K] to per-token losses [N], with both clips.

    ``cfg.pointwise_clip`` c: each term is clamped to at most c before the sum (the OPSD
    reference's clip; see :func:`token_divergence`); ``clipped_N`` is the fraction of clamped
    entries. ``cfg.token_clip`` c: the per-token loss is clamped to at most c; ``clipped_N`` is
    1 on such rows. ``div_N`` is the unclipped sum either way.

    ``in_place`` clamps ``terms_NK`` in its own memory (the closed-form path, which holds no
    autograd graph and counts its [N, V] buffers); the naive path keeps the clamp out of place
    so autograd sees it.
    """
    c = cfg.pointwise_clip
    over_NK = over_N = None
    if c is not None:
        over_NK = terms_NK.detach() > c
        div_N = terms_NK.detach().sum(-1)
        clipped_N = over_NK.to(terms_NK.dtype).mean(-1)
        loss_N = (terms_NK.clamp_(max=c) if in_place else terms_NK.clamp(max=c)).sum(-1)
    else:
        loss_N = terms_NK.sum(-1)
        div_N = loss_N.detach()
        clipped_N = torch.zeros_like(div_N)
    loss_N, clipped_N, over_N = apply_token_clip(loss_N, clipped_N, cfg)
    return Clips(loss_N, div_N, clipped_N, over_NK, over_N)


def apply_token_clip(
    loss_N: torch.Tensor, clipped_N: torch.Tensor, cfg: LossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``cfg.token_clip`` c on per-token losses (after any point-wise clip): (loss_N clamped to
    at most c, clipped_N set to 1 where it binds, over_N the bool rows whose gradient is zero;
    None when the clip is off). Part of :func:`apply_clips`, and what the Triton kernel's
    caller applies to the sums the kernel returns (``opsd_mm.loss.kernel``)."""
    if cfg.token_clip is None:
        return loss_N, clipped_N, None
    over_N = loss_N.detach() > cfg.token_clip
    clipped_N = torch.where(over_N, torch.ones_like(clipped_N), clipped_N)
    return loss_N.clamp(max=cfg.token_clip), clipped_N, over_N


def sampled_token_logprobs(
    logp_NV: torch.Tensor, sampled_ids_N: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, 1], log p(y) [N]) of the sampled tokens; a ValueError without ids (the one
    mode that needs them, ``sampled_pg``)."""
    if sampled_ids_N is None:
        raise ValueError("loss.divergence=sampled_pg needs the sampled token ids")
    ids_N1 = sampled_ids_N.long()[:, None]
    return ids_N1, logp_NV.gather(-1, ids_N1).squeeze(-1)


def sampled_pg_loss(
    student_y_N: torch.Tensor, teacher_y_N: torch.Tensor, cfg: LossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sampled_pg`` from the log-probabilities of the sampled tokens y, [N] each ->
    (loss_N, div_N, clipped_N, advantage_N).

    div_N = log p_s(y) - log p_t(y) (detached, the single-sample estimate of KL(S || T));
    advantage_N = -min(div_N, token_clip) (the clip caps how hard an over-confident token is
    pushed down; ``clipped_N`` 1 where it binds); loss_N = -advantage_N * log p_s(y), whose
    gradient w.r.t. the student logits is advantage_N * (S - onehot(y)).
    """
    div_N = (student_y_N - teacher_y_N).detach()
    cost_N = div_N
    clipped_N = torch.zeros_like(div_N)
    if cfg.token_clip is not None:
        clipped_N = (div_N > cfg.token_clip).to(div_N.dtype)
        cost_N = div_N.clamp(max=cfg.token_clip)
    advantage_N = -cost_N
    return -advantage_N * student_y_N, div_N, clipped_N, advantage_N


def _entropy_N(logp_NV: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return -(logp_NV.exp() * logp_NV).sum(-1)


def sampled_logprob_N(
    student_logits_NV: torch.Tensor,
    student_logp_NV: torch.Tensor,
    sampled_ids_N: torch.Tensor | None,
    cfg: LossConfig,
) -> torch.Tensor:
    """Detached temperature-1 log p_s(y) of the sampled tokens (reuses the loss's log-softmax
    when the loss temperature is 1); NaN where no ids are given."""
    with torch.no_grad():
        if sampled_ids_N is None:
            return torch.full(
                student_logp_NV.shape[:1],
                math.nan,
                dtype=student_logp_NV.dtype,
                device=student_logp_NV.device,
            )
        logp_NV = student_logp_NV
        if loss_temperature(cfg) != 1.0:
            logp_NV = F.log_softmax(student_logits_NV.to(student_logp_NV.dtype), dim=-1)
        return logp_NV.gather(-1, sampled_ids_N.long()[:, None]).squeeze(-1)


def token_divergence(
    student_logits_NV: torch.Tensor,
    teacher_logits_NV: torch.Tensor | TeacherLogprobs,
    sampled_ids_N: torch.Tensor | None,
    cfg: LossConfig,
) -> DivergenceOut:
    """Per-token loss between student and teacher next-token distributions, [N, V] -> [N].

    Both logits are upcast to fp32 (float64 stays float64) and divided by ``cfg.temperature``
    before the log-softmax; the teacher's are detached here whatever the caller passed. Then:

    - top-k (``cfg.top_k`` > 0): the support is the teacher's k most likely tokens per position,
      renormalised, or with one extra tail bucket (``cfg.top_k_tail_bucket``);
    - the divergence is summed over the support (the mode's ``terms``, ``opsd_mm.loss.modes``);
    - ``cfg.pointwise_clip`` c clamps each support term to at most c before the sum (zero
      gradient where it binds). This matches the OPSD reference (siyan-zhao/OPSD,
      ``opsd_trainer.py``, its ``jsd_token_clip``, 0.05 in the v3 recipes): despite that name it
      clamps the *signed* element-wise divergence tensor of shape [..., V] from above only
      (``clamp(max=c)``, no absolute value, negative terms untouched) before masking and
      summing, i.e. it is a point-wise clip;
    - ``cfg.token_clip`` c clamps the per-token loss to at most c (zero gradient where it binds).

    ``sampled_pg`` (the mode whose table entry is ``sampled_token_only``) uses only the sampled
    token y (``sampled_ids_N``): the advantage A = (log p_t(y) - log p_s(y)).detach() and
    ``loss_N = -A * log p_s(y)``, whose gradient is the single-sample estimate of the gradient of
    KL(S || T) under on-policy samples (the value is a surrogate, not a divergence; ``div_N``
    holds the estimate log p_s(y) - log p_t(y)). Under a token clip c the per-token estimate is
    capped before it becomes the advantage: A = -min(log p_s(y) - log p_t(y), c), so
    over-confident tokens push down no harder than c.

    The teacher may also come as :class:`~opsd_mm.types.TeacherLogprobs` (scored on the
    generation server, ``teacher.scoring=server``): its sampled-token log-probabilities for
    ``sampled_pg``, its top-k ids and log-probabilities for a top-k support (:func:`topk_support`);
    both are full-vocabulary log-softmaxes at temperature 1, so the loss temperature must be 1.
    The teacher entropy is then unknown (NaN): the full distribution never reached the trainer.
    """
    dtype = torch.promote_types(student_logits_NV.dtype, torch.float32)
    s_NV = student_logits_NV.to(dtype)
    tau = loss_temperature(cfg)
    scored = isinstance(teacher_logits_NV, TeacherLogprobs)
    if scored:
        check_scored_teacher(teacher_logits_NV, cfg, s_NV.shape[0])
    else:
        t_NV = teacher_logits_NV.detach().to(dtype)
    if tau != 1.0:
        s_NV = s_NV / tau
        if not scored:
            t_NV = t_NV / tau
    s_logp_NV = F.log_softmax(s_NV, dim=-1)
    t_logp_NV = None
    if not scored:
        with torch.no_grad():
            t_logp_NV = F.log_softmax(t_NV, dim=-1)
    student_entropy_N = _entropy_N(s_logp_NV.detach())
    if t_logp_NV is not None:
        teacher_entropy_N = _entropy_N(t_logp_NV)
    else:
        teacher_entropy_N = torch.full_like(student_entropy_N, math.nan)
    student_logprob_N = sampled_logprob_N(student_logits_NV, s_logp_NV, sampled_ids_N, cfg)

    mode = mode_for(cfg.divergence, cfg.beta)
    if mode.sampled_token_only:
        ids_N1, s_y_N = sampled_token_logprobs(s_logp_NV, sampled_ids_N)
        if scored:
            t_y_N = teacher_logits_NV.token_N.detach().to(dtype)
        else:
            t_y_N = t_logp_NV.gather(-1, ids_N1).squeeze(-1)
        loss_N, div_N, clipped_N, _ = sampled_pg_loss(s_y_N, t_y_N, cfg)
    else:
        if scored:
            s_NK, t_NK = topk_support(
                s_logp_NV,
                teacher_logits_NV.topk_ids_NK,
                teacher_logits_NV.topk_NK.detach(),
                cfg.top_k_tail_bucket,
            )
        else:
            s_NK, t_NK = _support_log_probs(s_logp_NV, t_logp_NV, cfg)
        terms_NK = mode.terms(s_NK, t_NK, cfg.beta)
        loss_N, div_N, clipped_N, _, _ = apply_clips(terms_NK, cfg)

    return DivergenceOut(
        loss_N=loss_N,
        div_N=div_N,
        clipped_N=clipped_N,
        student_entropy_N=student_entropy_N,
        teacher_entropy_N=teacher_entropy_N,
        student_logprob_N=student_logprob_N,
    )


def check_scored_teacher(teacher: TeacherLogprobs, cfg: LossConfig, n_tokens: int) -> None:
    """A scored teacher (N tokens) can stand in for the logits only where it carries what the
    loss reads (see :func:`token_divergence`); a ValueError says what is missing."""
    if loss_temperature(cfg) != 1.0:
        raise ValueError(
            f"a scored teacher holds temperature-1 log-probabilities; loss.temperature="
            f"{cfg.temperature} needs the teacher's logits"
        )
    if teacher.token_N.shape[0] != n_tokens:
        raise ValueError(
            f"scored teacher covers {teacher.token_N.shape[0]} tokens, the student {n_tokens}"
        )
    if not mode_for(cfg.divergence, cfg.beta).sampled_token_only:
        k = 0 if teacher.topk_ids_NK is None else teacher.topk_ids_NK.shape[-1]
        if cfg.top_k <= 0 or k != cfg.top_k or teacher.topk_NK is None:
            raise ValueError(
                f"loss.divergence={cfg.divergence} with loss.top_k={cfg.top_k} needs the "
                f"teacher's top-{cfg.top_k}; the scored teacher has top-{k} (a full-vocabulary "
                "divergence needs the teacher's logits)"
            )
