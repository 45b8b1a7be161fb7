"""The divergence modes, as one table: what each ``loss.divergence`` computes, in one place.

Why a table: the naive path (``opsd_mm.loss.divergences``), the closed-form gradients
(``opsd_mm.loss.closed_form``) and the fused path (``opsd_mm.loss.fused``) all need to know, per
mode, its vocabulary terms, whether it has a closed-form gradient, and whether it reads the
sampled token only. They look the mode up here (:func:`mode_for`) and branch on its fields, never
on its name, so a new mode is one :data:`MODES` entry plus its functions, and the JSD's endpoint
rule is written once.

The modes (S = student, T = teacher, s = log S, t = log T, both at the loss temperature):

- ``forward_kl``: KL(T || S) = sum_v T_v (t_v - s_v), mass-covering.
- ``reverse_kl``: KL(S || T) = sum_v S_v (s_v - t_v), mode-seeking.
- ``jsd``: GKD's generalized JSD (arXiv 2306.13649, Eq. 1) with the mixture
  M = beta T + (1-beta) S: beta KL(T || M) + (1-beta) KL(S || M). At beta=0 it is exactly
  forward KL and at beta=1 exactly reverse KL (:func:`mode_for` returns those entries there).
- ``sampled_pg``: the on-policy reverse-KL policy gradient on the sampled token y alone; it has
  no vocabulary terms (``opsd_mm.loss.divergences.sampled_pg_loss`` computes it).

Two forms per vocabulary mode, both pure arithmetic on log-distributions:

- ``terms(student_logp_NK, teacher_logp_NK, beta) -> terms_NK``: the per-entry terms whose sum
  over the support is the divergence. Point-wise clipping acts on these, so their split is part
  of the definition. Differentiable: the naive path (and top-k supports on the fused path) take
  the gradient by autograd through them.
- ``terms_and_grad(sides, S_NV, beta) -> (terms_NV, g_NV)``: the same terms on the full
  vocabulary with g = d(sum_v terms_v)/ds taken as if the s_v were free (the log-softmax's
  Jacobian is applied by the caller). ``sides = [s_NV, t_NV, T_NV]`` is emptied and its tensors
  are overwritten in place, so the closed-form chunk holds as few [N, V] buffers as possible;
  ``S_NV`` is read, never written. Same values as ``terms`` within an ulp.

A third form, for ``loss.kernel=triton``: the same terms and g written as Triton code, one
branch per mode in ``opsd_mm.loss.triton_divergence._terms_and_grad``, selected by the entry's
``kernel_mode`` (one of the ``KERNEL_*`` numbers below; None: no kernel branch, and
``loss.kernel=auto`` runs the torch closed form).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# The branches of the Triton kernel (``opsd_mm.loss.triton_divergence``), by number: a
# DivergenceMode's ``kernel_mode``.
KERNEL_FORWARD_KL = 0
KERNEL_REVERSE_KL = 1
KERNEL_JSD = 2
KERNEL_SAMPLED_TOKEN = 3


@dataclass(frozen=True)
class DivergenceMode:
    """One ``loss.divergence`` value: its name and the functions that compute it.

    ``terms``: (student_logp_NK, teacher_logp_NK, beta) -> terms_NK, whose sum over K is the
    divergence; None for a mode that reads only the sampled token.
    ``terms_and_grad``: the closed form, (sides=[s_NV, t_NV, T_NV] which it empties, S_NV, beta)
    -> (terms_NV, g_NV = d(sum terms)/ds taken as if s were free); None: the fused path takes
    the gradient by autograd through ``terms``.
    ``sampled_token_only``: reads only log p(y) of the sampled token y: no vocabulary terms, no
    top-k support, no point-wise clip (its loss and closed-form gradient are the shared
    sampled-token ones, ``opsd_mm.loss.divergences.sampled_pg_loss``).
    ``kernel_mode``: the mode's branch in the Triton kernel (a ``KERNEL_*`` number), None
    without one (``loss.kernel=auto`` then runs the torch path; ``triton`` is a config error).
    """

    name: str
    terms: Callable[..., torch.Tensor] | None
    terms_and_grad: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None
    sampled_token_only: bool = False
    kernel_mode: int | None = None

    def __post_init__(self) -> None:
        # A mode either sums vocabulary terms or reads the sampled token, never both or neither;
        # a closed form is the closed form of some terms.
        if (self.terms is None) != self.sampled_token_only:
            raise ValueError(f"mode {self.name!r}: terms must be None exactly when sampled-only")
        if self.terms is None and self.terms_and_grad is not None:
            raise ValueError(f"mode {self.name!r}: terms_and_grad without terms")
        if (self.kernel_mode == KERNEL_SAMPLED_TOKEN) != (
            self.sampled_token_only and self.kernel_mode is not None
        ):
            raise ValueError(f"mode {self.name!r}: the sampled-token kernel is for sampled modes")


# ----------------------------------------------------------------------------- forward KL


def forward_kl_terms(
    student_logp_NK: torch.Tensor, teacher_logp_NK: torch.Tensor, beta: float
) -> torch.Tensor:
    """KL(T || S), forward, mass-covering: terms T_v (t_v - s_v). ``beta`` is unused (the
    table's common signature)."""
    s, t = student_logp_NK, teacher_logp_NK
    return t.exp() * (t - s)


def forward_kl_terms_and_grad(
    sides: list[torch.Tensor | None], S_NV: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(T || S) in closed form: terms T (t - s) and g = -T (T does not depend on s), so
    through the log-softmax dL/dz = S - T. The terms take t's memory, g takes T's."""
    s_NV, t_NV, T_NV = sides
    sides.clear()
    terms_NV = t_NV.sub_(s_NV).mul_(T_NV)  # T (t - s), in t's memory
    return terms_NV, T_NV.neg_()


# ----------------------------------------------------------------------------- reverse KL


def reverse_kl_terms(
    student_logp_NK: torch.Tensor, teacher_logp_NK: torch.Tensor, beta: float
) -> torch.Tensor:
    """KL(S || T), reverse, mode-seeking: terms S_v (s_v - t_v). ``beta`` is unused."""
    s, t = student_logp_NK, teacher_logp_NK
    return s.exp() * (s - t)


def reverse_kl_terms_and_grad(
    sides: list[torch.Tensor | None], S_NV: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(S || T) in closed form: terms S (s - t) and g = d/ds [e^s (s - t)] = S (s - t + 1),
    i.e. terms + S. T is dropped at once; g takes s's memory."""
    s_NV, t_NV, T_NV = sides
    sides.clear()
    del T_NV
    terms_NV = S_NV * s_NV.sub_(t_NV)
    return terms_NV, s_NV.copy_(terms_NV).add_(S_NV)


# ----------------------------------------------------------------------------- generalized JSD


def jsd_terms(
    student_logp_NK: torch.Tensor, teacher_logp_NK: torch.Tensor, beta: float
) -> torch.Tensor:
    """GKD's generalized JSD for 0 < beta < 1: beta KL(T || M) + (1-beta) KL(S || M), with
    M = beta T + (1-beta) S. Terms beta T_v (t_v - m_v) + (1-beta) S_v (s_v - m_v), with
    m = log M taken as a log-sum-exp of the two log-distributions (as the OPSD reference and TRL
    compute it). At beta 0 or 1 ``math.log`` of the zero weight fails: :func:`mode_for` never
    sends the endpoints here."""
    s, t = student_logp_NK, teacher_logp_NK
    m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
    # Scalars applied last: S = exp(s) is then saved once for backward (by exp and by the
    # product alike) instead of also saving (1-beta) * S, one [N, K] tensor less at the peak.
    return beta * (t.exp() * (t - m)) + (1.0 - beta) * (s.exp() * (s - m))


def jsd_terms_and_grad(
    sides: list[torch.Tensor | None], S_NV: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The generalized JSD in closed form, for 0 < beta < 1.

    With a = t - m and b = s - m: dJSD/dS_v = (1-beta) (b_v + 1) - (1-beta) (beta T_v +
    (1-beta) S_v) / M_v = (1-beta) b_v, since the mixture weights are the KL weights
    (beta T + (1-beta) S = M): the derivative through M cancels the "+1". So g = (1-beta) S b.
    b <= -log(1-beta) and a <= -log(beta) are bounded, so nothing is 0/0 where M underflows.
    Each entry's term depends on S_v alone, so a point-wise clip zeroes exactly that entry's
    g_v. Buffers: a takes t's memory, b m's, g b's; one temporary for the terms.
    """
    s_NV, t_NV, T_NV = sides
    sides.clear()
    m_NV = t_NV + math.log(beta)
    torch.logaddexp(m_NV, s_NV + math.log1p(-beta), out=m_NV)
    a_NV = t_NV.sub_(m_NV)  # log T/M <= -log(beta), in t's memory
    b_NV = torch.sub(s_NV, m_NV, out=m_NV)  # log S/M <= -log(1-beta), in m's memory
    del s_NV, t_NV, m_NV
    # terms = beta T a + (1-beta) S b: one temporary, the second product fused into it.
    terms_NV = torch.mul(T_NV, a_NV).mul_(beta).addcmul_(S_NV, b_NV, value=1.0 - beta)
    del T_NV, a_NV
    # g = (1-beta) S b, in b's memory.
    return terms_NV, b_NV.mul_(S_NV).mul_(1.0 - beta)


# ----------------------------------------------------------------------------- the table

# In the order of LossConfig.divergence's Literal (tests/loss/test_modes.py checks the names).
MODES: dict[str, DivergenceMode] = {
    m.name: m
    for m in (
        DivergenceMode("jsd", jsd_terms, jsd_terms_and_grad, kernel_mode=KERNEL_JSD),
        DivergenceMode(
            "forward_kl",
            forward_kl_terms,
            forward_kl_terms_and_grad,
            kernel_mode=KERNEL_FORWARD_KL,
        ),
        DivergenceMode(
            "reverse_kl",
            reverse_kl_terms,
            reverse_kl_terms_and_grad,
            kernel_mode=KERNEL_REVERSE_KL,
        ),
        DivergenceMode(
            "sampled_pg", None, None, sampled_token_only=True, kernel_mode=KERNEL_SAMPLED_TOKEN
        ),
    )
}


def mode_for(divergence: str, beta: float) -> DivergenceMode:
    """The entry the loss runs: jsd at beta=0 is exactly forward_kl's entry, at beta=1 exactly
    reverse_kl's (the endpoint rule, written once, here).

    Why the endpoints are special-cased (as the OPSD reference does): the JSD formula itself
    tends to 0 at either end (the heavily weighted KL compares a distribution with a mixture
    that tends to it, and the other term's weight vanishes), while GKD defines beta=0 as
    KL(T || S) and beta=1 as KL(S || T). Other modes ignore ``beta``. A ValueError names the
    known modes for an unknown ``divergence``.
    """
    mode = MODES.get(divergence)
    if mode is None:
        raise ValueError(f"loss.divergence={divergence!r} is not one of {list(MODES)}")
    if mode is MODES["jsd"]:
        if beta == 0.0:
            return MODES["forward_kl"]
        if beta == 1.0:
            return MODES["reverse_kl"]
    return mode
