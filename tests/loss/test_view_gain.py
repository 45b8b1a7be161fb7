"""The view gain and VA-OPD's weighting (opsd_mm/loss/view_gain.py): the coefficients against a
computation by hand from the paper's definition, the metrics, and fixed per-token weights on the
fused path against the naive reference."""

from __future__ import annotations

import math

import pytest
import torch

from opsd_mm.config import LossConfig
from opsd_mm.loss.divergences import token_divergence
from opsd_mm.loss.fused import fused_divergence
from opsd_mm.loss.importance import importance_weights
from opsd_mm.loss.view_gain import (
    EPS,
    gain_metrics,
    gain_sums,
    rollout_weights,
    token_multipliers,
    va_opd_coefficients,
)

# Two prompts: A with two rollouts (5 and 3 loss tokens), B with one (2 tokens, a tie).
GAINS = [
    torch.tensor([0.5, -0.2, 1.0, 0.1, 0.0]),
    torch.tensor([0.0, 0.3, -1.0]),
    torch.tensor([0.2, 0.2]),
]
GROUPS = ["A", "A", "B"]


def hand_coefficients(tau: float, p: float, h: float) -> list[list[float]]:
    """VA-OPD's coefficients for GAINS, by hand: VA = max(g, 0); rollout means A1 = 1.6 / 5,
    A2 = 0.3 / 3; within A z-scored with the population std and softmaxed at tau; B alone has
    weight 1; the ceil(p * T) highest-VA tokens share h of the rollout's weight, the rest 1 - h."""
    m1, m2 = 1.6 / 5, 0.3 / 3
    mu = (m1 + m2) / 2
    sd = math.sqrt(((m1 - mu) ** 2 + (m2 - mu) ** 2) / 2)
    z1, z2 = (m1 - mu) / (sd + EPS), (m2 - mu) / (sd + EPS)
    w1 = math.exp(z1 / tau) / (math.exp(z1 / tau) + math.exp(z2 / tau))
    w2 = 1 - w1

    def split(w: float, n: int, high: list[int]) -> list[float]:
        low = n - len(high)
        return [w * h / len(high) if i in high else w * (1 - h) / low for i in range(n)]

    # p = 0.2: ceil(1.0) = 1 of A1 (token 2, VA 1.0), ceil(0.6) = 1 of A2 (token 1, VA 0.3),
    # ceil(0.4) = 1 of B (the tie: the earlier token, 0).
    assert p == 0.2
    return [split(w1, 5, [2]), split(w2, 3, [1]), split(1.0, 2, [0])]


@pytest.mark.parametrize("tau, h", [(1.0, 0.5), (0.5, 0.8)])
def test_va_opd_coefficients_by_hand(tau, h):
    coeffs, metrics = va_opd_coefficients(GAINS, GROUPS, tau, 0.2, h)
    want = hand_coefficients(tau, 0.2, h)
    for got, ref in zip(coeffs, want):
        assert got.tolist() == pytest.approx(ref, rel=1e-6)
    # Each prompt's coefficients sum to 1.
    assert float(coeffs[0].sum() + coeffs[1].sum()) == pytest.approx(1.0)
    assert float(coeffs[2].sum()) == pytest.approx(1.0)
    # The share of positive gain in the high groups: (1.0 + 0.3 + 0.2) / (1.6 + 0.3 + 0.4).
    assert metrics["view_gain/high_share"] == pytest.approx(1.5 / 2.3)
    assert metrics["view_gain/rollout_weight_min"] == pytest.approx(min(sum(w) for w in want[:2]))
    assert metrics["view_gain/rollout_weight_max"] == 1.0


def test_multipliers_make_the_step_mean_the_va_opd_objective():
    """With the step normalised by its T loss tokens, sum_t (c_t T / P) loss_t / T equals VA-OPD's
    sum_t c_t loss_t / P."""
    coeffs, _ = va_opd_coefficients(GAINS, GROUPS, 1.0, 0.2, 0.5)
    loss = [
        torch.rand(len(g), generator=torch.Generator().manual_seed(i)) for i, g in enumerate(GAINS)
    ]
    T, P = 10.0, 2.0
    mult = token_multipliers(coeffs, T, P)
    step = sum(float((m * x).sum()) for m, x in zip(mult, loss)) / T
    objective = sum(float((c * x).sum()) for c, x in zip(coeffs, loss)) / P
    assert step == pytest.approx(objective, rel=1e-6)
    assert sum(float(m.sum()) for m in mult) == pytest.approx(T)  # the mean factor is 1


def test_equal_means_give_equal_rollout_weights_and_empty_rollouts_none():
    w = rollout_weights(torch.tensor([0.3, 0.3, 0.3]), ["g"] * 3)
    assert w.tolist() == pytest.approx([1 / 3] * 3)
    coeffs, _ = va_opd_coefficients(
        [torch.tensor([1.0, 0.0]), torch.zeros(0), torch.tensor([0.0, 2.0])],
        ["g", "g", "g"],
        1,
        0.5,
        0.5,
    )
    assert coeffs[1].numel() == 0
    assert float(coeffs[0].sum() + coeffs[2].sum()) == pytest.approx(1.0)
    # A one-token rollout's whole weight goes to its token (no low group).
    single, _ = va_opd_coefficients([torch.tensor([0.4])], ["x"], 1.0, 0.2, 0.5)
    assert single[0].tolist() == [1.0]


def test_gain_metrics():
    sums = gain_sums(GAINS)
    assert sums.tolist() == pytest.approx([1.1, 10, 6])
    m = gain_metrics(sums + gain_sums([torch.tensor([-0.1])]))  # summed over "processes"
    assert m == pytest.approx({"view_gain/mean": 1.0 / 11, "view_gain/positive_share": 6 / 11})
    assert all(math.isnan(v) for v in gain_metrics(gain_sums([])).values())


# ----------------------------------------------------------------------------- token weights

N, H, V = 2 * 37, 29, 301


@pytest.mark.parametrize("divergence", ["jsd", "reverse_kl", "sampled_pg"])
@pytest.mark.parametrize("importance", [False, True])
def test_fused_token_weights_match_the_naive_reference(divergence, importance):
    """Fixed token weights multiply each token's loss and gradient, alone and together with the
    importance weights, on the fused path as on the naive one (fp32: loss rtol 1e-5, gradients
    1e-4 of their largest entry, as the fused path's own parity tests)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(V, H, generator=g) / H**0.5 * 2
    h = torch.randn(N, H, generator=g)
    ht = h + 0.5 * torch.randn(N, H, generator=g)
    ids = torch.randint(0, V, (N,), generator=g)
    tw = torch.rand(N, generator=g) * 3
    rollout = torch.randn(N, generator=g) - 5 if importance else None
    cfg = LossConfig(divergence=divergence, importance_clip=2.0 if importance else None)

    h1 = h.clone().requires_grad_(True)
    loss, stats = fused_divergence(
        h1, ht, w, ids, cfg, scale=0.1, chunk_size=17, rollout_logprob_N=rollout, token_weight_N=tw
    )
    loss.backward()

    h2 = h.clone().requires_grad_(True)
    out = token_divergence(h2 @ w.T, ht @ w.T, ids, cfg)
    weights = tw.clone()
    if importance:
        weights = weights * importance_weights(out.student_logprob_N, rollout, 2.0)
    ref = 0.1 * (out.loss_N * weights).sum()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(stats.loss_N, out.loss_N.detach(), rtol=1e-5, atol=1e-6)  # unweighted
    scale = h2.grad.abs().max()
    assert (h1.grad - h2.grad).abs().max() <= 1e-4 * scale
    # Not the unweighted loss: the weights did something.
    assert abs(loss.item() - 0.1 * out.loss_N.sum().item()) > 1e-3
