"""Closed-form gradients of the full-vocabulary divergences w.r.t. the student logits.

Why: the fused path (``opsd_mm.loss.fused``) needs, per chunk, the per-token losses *and* the
gradient of their sum w.r.t. the chunk's student logits. Taking that gradient by autograd through
:func:`opsd_mm.loss.divergences.token_divergence` replays every elementwise op of the forward pass
backwards and keeps its saved tensors alive: ~13 fp32 [c, V] buffers and twice the memory
traffic. The gradients have short closed forms, computed here in one forward sweep that reuses
the probabilities the loss needs anyway. The elementwise work over [c, V] is what bounds the
fused loss once the matmuls run on tensor cores, so this is where its speed comes from.

:func:`token_divergence` stays the reference: ``tests/loss/test_divergence_grad.py`` checks values
and gradients against autograd through it (fp64 and fp32, every mode, clips, temperatures,
extreme logits). Top-k supports (gather/renormalise/tail bucket) keep the autograd path, and so
does a mode whose entry in ``opsd_mm.loss.modes`` has no ``terms_and_grad``: :func:`has_closed_form`
says which settings are covered. The per-mode formulas are not here either: each mode's
``terms_and_grad`` sits beside its ``terms`` in ``opsd_mm.loss.modes``, and this module looks the
mode up (``mode_for``) and branches on its fields, never on its name. The clips and the
sampled-token advantage are not re-coded: :func:`opsd_mm.loss.divergences.apply_clips` (in
place) and :func:`opsd_mm.loss.divergences.sampled_pg_loss` serve both paths. What is here is the
part all modes share: the log-softmax's Jacobian, the clips' zero-gradient entries, and the
sampled-token gradient.

Notation (shapes [c, V] unless said): z the student logits, tau the temperature,
s = log_softmax(z / tau), S = exp(s); t, T the teacher's. For a loss L = sum_v terms_v(s), with
g_v = dL/ds_v taken as if the s_v were free, the log-softmax gives
dL/dz = (g - S * sum_v g_v) / tau. Per mode, g comes from the mode's ``terms_and_grad``
(derivations in their docstrings, ``opsd_mm.loss.modes``):

- forward KL, KL(T || S) (mass-covering), terms T (t - s): g = -T, so dL/dz = (S - T) / tau.
- reverse KL, KL(S || T) (mode-seeking), terms S (s - t): g = S (s - t + 1).
- JSD(beta) = beta KL(T || M) + (1-beta) KL(S || M), M = beta T + (1-beta) S, m = log M:
  g = (1-beta) S (s - m), the derivative through M cancelling the rest. Each entry's term
  depends on S_v alone, so a point-wise clip zeroes exactly that entry's g_v.
- point-wise clip c: g_v = 0 where terms_v > c (``clamp``'s gradient); token clip c: g = 0 on
  the rows whose (point-wise clipped) loss exceeds c.
- sampled_pg, loss = -A log p_s(y) with A detached: dL/dz = A (S - onehot(y)) / tau.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opsd_mm.config import LossConfig
from opsd_mm.loss.divergences import (
    DivergenceOut,
    apply_clips,
    loss_temperature,
    sampled_logprob_N,
    sampled_pg_loss,
    sampled_token_logprobs,
)
from opsd_mm.loss.modes import mode_for
from opsd_mm.types import TeacherLogprobs


def has_closed_form(cfg: LossConfig, vocab_size: int) -> bool:
    """True when :func:`divergence_and_grad` covers these settings: the full vocabulary (top-k
    off, or k >= V, which ``token_divergence`` also treats as full) and a mode with a closed
    form (a ``terms_and_grad`` in its table entry, or sampled-token-only, whose gradient is
    the shared one here)."""
    mode = mode_for(cfg.divergence, cfg.beta)
    full_vocab = cfg.top_k <= 0 or cfg.top_k >= vocab_size
    return full_vocab and (mode.terms_and_grad is not None or mode.sampled_token_only)


def no_closed_form_reason(cfg: LossConfig, vocab_size: int) -> str:
    """What :func:`has_closed_form` lacks, for error messages: the top-k support, or the
    mode's closed form."""
    if 0 < cfg.top_k < vocab_size:
        return f"loss.top_k={cfg.top_k} (< V={vocab_size})"
    return f"loss.divergence={cfg.divergence} (its mode has no terms_and_grad)"


def _log_probs(logits_NV: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    if temperature == 1.0:
        # Upcasts inside the kernel: no fp32 copy of bf16 logits (bitwise the same result).
        return F.log_softmax(logits_NV.detach(), dim=-1, dtype=dtype)
    return F.log_softmax(logits_NV.detach().to(dtype) / temperature, dim=-1)


def _entropy_N(p_NV: torch.Tensor, logp_NV: torch.Tensor) -> torch.Tensor:
    # A batched dot product reads both once and writes no [N, V] product.
    return -torch.einsum("nv,nv->n", p_NV, logp_NV)


def divergence_and_grad(
    student_logits_NV: torch.Tensor,
    teacher_logits_NV: torch.Tensor,
    sampled_ids_N: torch.Tensor | None,
    cfg: LossConfig,
) -> tuple[DivergenceOut, torch.Tensor]:
    """``token_divergence`` (detached) and d(sum_n loss_n)/d(student logits), [N, V].

    Same dtype rule as ``token_divergence``: fp32 math (float64 stays float64); the gradient is
    returned in that dtype. The inputs are left untouched. Raises ValueError for settings
    without a closed form (top-k).
    """
    return consume_divergence_and_grad([student_logits_NV, teacher_logits_NV], sampled_ids_N, cfg)


@torch.no_grad()
def consume_divergence_and_grad(
    logits: list[torch.Tensor | None],
    sampled_ids_N: torch.Tensor | None,
    cfg: LossConfig,
) -> tuple[DivergenceOut, torch.Tensor]:
    """:func:`divergence_and_grad` on ``logits = [student_NV, teacher_NV]``, which it empties
    (sets to None) as soon as each side is converted to log-probabilities.

    Why a list: a caller that hands over its only references lets each [N, V] logits tensor be
    freed mid-computation (arguments passed directly stay referenced by the caller until the call
    returns). Buffers are reused in place where the formulas allow, so the working set stays at
    six fp32 [N, V] tensors for the JSD, four for the other modes (the fused path's per-chunk
    peak; bench/chunk_working_set.py). ``cfg`` is not checked again here, per chunk: the
    callers check it once (:func:`divergence_and_grad`, ``fused_divergence``, config load).
    """
    n_vocab = logits[0].shape[-1]
    if not has_closed_form(cfg, n_vocab):
        raise ValueError(
            f"no closed-form gradient for {no_closed_form_reason(cfg, n_vocab)}; use autograd "
            "through token_divergence"
        )
    mode = mode_for(cfg.divergence, cfg.beta)
    # A teacher scored elsewhere (TeacherLogprobs: teacher.scoring=server) carries log p_t(y)
    # only, which is all a sampled-token-only mode's gradient reads; its entropy is unknown (NaN).
    scored = logits[1] if isinstance(logits[1], TeacherLogprobs) else None
    if scored is not None and not mode.sampled_token_only:
        raise ValueError(
            "a scored teacher has a closed-form gradient for sampled-token-only modes "
            "(sampled_pg) only"
        )
    dtype = torch.promote_types(logits[0].dtype, torch.float32)
    tau = loss_temperature(cfg)
    s_NV = _log_probs(logits[0], dtype, tau)
    student_logprob_N = sampled_logprob_N(logits[0].detach(), s_NV, sampled_ids_N, cfg)
    logits[0] = None
    S_NV = s_NV.exp()
    student_entropy_N = _entropy_N(S_NV, s_NV)
    if scored is None:
        t_NV = _log_probs(logits[1], dtype, tau)
        T_NV = t_NV.exp()
        teacher_entropy_N = _entropy_N(T_NV, t_NV)
    else:
        t_NV = T_NV = None
        teacher_entropy_N = torch.full_like(student_entropy_N, float("nan"))
    logits[1] = None

    if mode.sampled_token_only:
        ids_N1, s_y_N = sampled_token_logprobs(s_NV, sampled_ids_N)
        if scored is None:
            t_y_N = t_NV.gather(-1, ids_N1).squeeze(-1)
        else:
            t_y_N = scored.token_N.to(dtype)
        del s_NV, t_NV, T_NV
        loss_N, div_N, clipped_N, advantage_N = sampled_pg_loss(s_y_N, t_y_N, cfg)
        grad_NV = S_NV.mul_(advantage_N[:, None])  # S is not needed any more: reuse its memory
        grad_NV.scatter_add_(-1, ids_N1, -advantage_N[:, None])
    else:
        # Hands over s, t and T (the mode's closed form drops them as it goes); keeps S for the
        # projection.
        sides = [s_NV, t_NV, T_NV]
        del s_NV, t_NV, T_NV
        terms_NV, g_NV = mode.terms_and_grad(sides, S_NV, cfg.beta)
        # The clips' zero-gradient entries and rows, as ``clamp`` would give them.
        loss_N, div_N, clipped_N, over_NV, over_N = apply_clips(terms_NV, cfg, in_place=True)
        del terms_NV
        if over_NV is not None:
            g_NV.masked_fill_(over_NV, 0.0)
            del over_NV
        if over_N is not None:
            g_NV.masked_fill_(over_N[:, None], 0.0)
        # Through the log-softmax: dL/dz = g - S * sum(g); in place in g.
        g_sum_N1 = g_NV.sum(-1, keepdim=True)
        grad_NV = g_NV.sub_(S_NV.mul_(g_sum_N1))
    if tau != 1.0:
        grad_NV.div_(tau)
    out = DivergenceOut(
        loss_N=loss_N,
        div_N=div_N,
        clipped_N=clipped_N,
        student_entropy_N=student_entropy_N,
        teacher_entropy_N=teacher_entropy_N,
        student_logprob_N=student_logprob_N,
    )
    return out, grad_NV
