"""The view gain: what the teacher's view of the images adds to its score of each sampled token,
and VA-OPD's weighting of the distillation loss by it.

Why: with image views (``processor.teacher_view``) the teacher's privilege is in the pixels. How
much it matters, token by token, is the teacher's log-probability of the student's token with its
own view minus with the student's view, the rest of its context unchanged (template, privileged
text, teacher-only images):

    g_t = log p_T(y_t | teacher context, teacher's view) - log p_T(y_t | teacher context,
          student's view)

at temperature 1. This is VA-OPD's visual advantage (arXiv 2605.21924: the teacher scores the
student's rollout with and without the fine visual detail) when the student's view is the one
without the detail. ``logging.view_gain_every`` logs its mean and the share of tokens where it is
positive; ``loss.view_weighting=va_opd`` weights the loss with it as VA-OPD does, with
VA_t = max(g_t, 0) (the positive part, as the paper defines it):

1. each rollout i of a prompt gets the mean m_i of VA_t over its loss tokens; within the
   prompt's rollouts the means are z-scored (population standard deviation, + 1e-6) and put
   through a softmax at temperature tau: w_i, summing to 1 over the prompt's rollouts (equal
   means: equal weights);
2. within rollout i, the ceil(p * T_i) tokens of highest VA (ties: the earlier token first) form
   the high group H_i, the rest the low group L_i; token t's coefficient is
   w_i * h / |H_i| in H_i and w_i * (1 - h) / |L_i| in L_i (an empty L_i: w_i / |H_i|);
3. the loss is sum_t c_t * loss_t / (number of prompts): each prompt weighs the same, each
   group within a rollout is averaged on its own.

The trainer normalises a step's loss by its loss-token count T (``loss.normalize=step_tokens``),
so it multiplies each token's loss by ``c_t * T / P`` (P prompts, both counted over all
processes): the step's loss is then exactly the VA-OPD objective. All weights are detached.

The teacher's two scores come from :func:`teacher_view_logprobs`: two forwards of the teacher
(no grad) over a batch whose teacher side holds the teacher prompts and whose student side
holds the same teacher prompts in the student's view (``Processor.gain_prompt``; in
``processor.gain_view`` when that is set: VA-OPD's own setting, where the student sees the full
image and only the gain's view is pixelated).
Shape suffixes as in ``opsd_mm.types``; R counts rollouts.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

from opsd_mm.loss.policy_gradient import sampled_logprob_fused
from opsd_mm.model.forward import completion_hidden, unwrap
from opsd_mm.teacher.weights import Teacher
from opsd_mm.types import PairBatch

EPS = 1e-6  # added to the population standard deviation of a prompt's rollout means


def teacher_view_logprobs(
    batch: PairBatch,
    model: torch.nn.Module,
    teacher: Teacher,
    mask_BC: torch.Tensor,
    packed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_T(y) with the teacher's view, log p_T(y) with the student's view), each [N] fp32
    over the tokens of ``mask_BC``, at temperature 1. ``batch.teacher`` holds the teacher prompts,
    ``batch.student`` the teacher prompts in the student's view (both followed by the same
    completions). Under ``torch.no_grad`` with the teacher's weights, as the loss's teacher
    forward."""
    width_C = batch.completion_ids_BC.shape[1]
    ids_N = batch.completion_ids_BC[mask_BC]
    out = []
    with torch.no_grad(), teacher.as_teacher(unwrap(model)) as teacher_model:
        for side in (batch.teacher, batch.student):
            hidden_NH, head = completion_hidden(teacher_model, side, width_C, mask_BC, packed)
            out.append(
                sampled_logprob_fused(
                    hidden_NH,
                    teacher.head_weight(head.weight),
                    ids_N,
                    bias_V=teacher.head_weight(head.bias),
                    temperature=1.0,
                ).float()
            )
    return out[0], out[1]


def gain_sums(gains_R: Sequence[torch.Tensor]) -> torch.Tensor:
    """[sum of g_t, tokens, tokens with g_t > 0] over the rollouts' tokens (fp64, for a sum over
    processes before :func:`gain_metrics`)."""
    if not gains_R:
        return torch.zeros(3, dtype=torch.float64)
    g_N = torch.cat([g.detach().double().cpu() for g in gains_R])
    return torch.stack([g_N.sum(), torch.tensor(float(g_N.numel())), (g_N > 0).sum().double()])


def gain_metrics(sums: torch.Tensor) -> dict[str, float]:
    """``view_gain/mean`` (nats per token) and ``view_gain/positive_share`` from
    :func:`gain_sums` (NaN without tokens)."""
    total, n, positive = (float(v) for v in sums)
    if n == 0:
        return {"view_gain/mean": math.nan, "view_gain/positive_share": math.nan}
    return {"view_gain/mean": total / n, "view_gain/positive_share": positive / n}


def rollout_weights(
    means_R: torch.Tensor, groups_R: Sequence[Hashable], temperature: float = 1.0
) -> torch.Tensor:
    """Step 1 of the module docstring: a softmax of the z-scored means within each group of
    rollouts (one group per prompt) -> [R] fp64, summing to 1 per group."""
    values = means_R.detach().double()
    weights = torch.empty_like(values)
    by_group: dict[Hashable, list[int]] = {}
    for r, g in enumerate(groups_R):
        by_group.setdefault(g, []).append(r)
    for rows in by_group.values():
        group = values[rows]
        z = (group - group.mean()) / (group.std(correction=0) + EPS)
        weights[rows] = torch.softmax(z / temperature, dim=0)
    return weights


def va_opd_coefficients(
    gains_R: Sequence[torch.Tensor],
    groups_R: Sequence[Hashable],
    temperature: float,
    high_fraction: float,
    high_weight: float,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Steps 1-2 of the module docstring: each rollout's per-token coefficients c_t (fp32,
    summing to 1 over a prompt's rollouts), from the per-token gains of its loss tokens. A
    rollout without loss tokens gets an empty tensor and no share of its prompt's weight.
    Also the metrics ``view_gain/high_share`` (the share of positive gain in the high groups)
    and the largest and smallest rollout weights."""
    va_R = [g.detach().double().clamp(min=0).cpu() for g in gains_R]
    real = [r for r, v in enumerate(va_R) if v.numel() > 0]
    coeffs = [torch.zeros(v.numel(), dtype=torch.float64) for v in va_R]
    if not real:
        return [c.float() for c in coeffs], {}
    means = torch.stack([va_R[r].mean() for r in real])
    weights = rollout_weights(means, [groups_R[r] for r in real], temperature)
    high_mass = total_mass = 0.0
    for w, r in zip(weights.tolist(), real):
        va = va_R[r]
        n = va.numel()
        n_high = max(1, math.ceil(high_fraction * n))
        order = torch.argsort(-va, stable=True)  # descending; ties keep token order
        high, low = order[:n_high], order[n_high:]
        if low.numel():
            coeffs[r][high] = w * high_weight / n_high
            coeffs[r][low] = w * (1 - high_weight) / low.numel()
        else:
            coeffs[r][high] = w / n_high
        high_mass += float(va[high].sum())
        total_mass += float(va.sum())
    metrics = {
        "view_gain/high_share": high_mass / total_mass if total_mass > 0 else math.nan,
        "view_gain/rollout_weight_max": float(weights.max()),
        "view_gain/rollout_weight_min": float(weights.min()),
    }
    return [c.float() for c in coeffs], metrics


def token_multipliers(
    coeffs_R: Sequence[torch.Tensor], tokens_global: float, prompts_global: float
) -> list[torch.Tensor]:
    """Step 3: ``c_t * T / P``, the factor on each token's loss under a step normalised by its
    loss-token count T, so that the step's loss is ``sum_t c_t loss_t / P``."""
    factor = tokens_global / max(prompts_global, 1.0)
    return [c * factor for c in coeffs_R]


__all__ = [
    "gain_metrics",
    "gain_sums",
    "rollout_weights",
    "teacher_view_logprobs",
    "token_multipliers",
    "va_opd_coefficients",
]
