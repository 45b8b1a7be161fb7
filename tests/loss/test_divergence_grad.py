"""Closed-form gradients vs autograd through the naive ``token_divergence``: values, per-token
stats and d(sum loss)/d(student logits), in fp64 (tight) and fp32."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opsd_mm.config import LossConfig
from opsd_mm.loss.closed_form import divergence_and_grad, has_closed_form
from opsd_mm.loss.divergences import token_divergence

N, V = 37, 211


def _cfg_id(cfg: LossConfig) -> str:
    changed = [
        f"{f.name}={getattr(cfg, f.name)}"
        for f in dataclasses.fields(cfg)
        if getattr(cfg, f.name) != f.default
    ]
    return ",".join(changed) or "default"


def _logits(dtype, spread=3.0, seed=0, n=N, v=V):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * spread
    t = s + torch.randn(n, v, generator=g, dtype=torch.float64) * spread * 0.5
    ids = torch.randint(0, v, (n,), generator=g)
    return s.to(dtype), t.to(dtype), ids


def _reference(s_logits, t_logits, ids, cfg):
    z = s_logits.detach().clone().requires_grad_()
    out = token_divergence(z, t_logits, ids, cfg)
    (grad,) = torch.autograd.grad(out.loss_N.sum(), z)
    return out, grad


def _check(cfg, dtype=torch.float64, spread=3.0, rtol=None):
    rtol = rtol or (1e-10 if dtype == torch.float64 else 1e-5)
    s, t, ids = _logits(dtype, spread)
    ref, grad_ref = _reference(s, t, ids, cfg)
    out, grad = divergence_and_grad(s, t, ids, cfg)
    assert grad.dtype == grad_ref.dtype and grad.shape == grad_ref.shape
    scale = float(grad_ref.abs().max())
    torch.testing.assert_close(grad, grad_ref, rtol=rtol, atol=rtol * scale)
    for f in dataclasses.fields(ref):
        a, b = getattr(out, f.name), getattr(ref, f.name).detach()
        assert not a.requires_grad, f.name
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol, msg=f.name)
    return out, grad


MODES = [
    *(LossConfig(divergence="jsd", beta=b) for b in (0.0, 0.1, 0.5, 0.9, 1.0)),
    LossConfig(divergence="forward_kl"),
    LossConfig(divergence="reverse_kl"),
    LossConfig(divergence="sampled_pg"),
]
VARIANTS = [
    *(
        LossConfig(divergence=d, temperature=tau)
        for d in ("jsd", "reverse_kl")
        for tau in (0.6, 1.7)
    ),
    LossConfig(divergence="sampled_pg", temperature=0.8),
    LossConfig(divergence="jsd", pointwise_clip=0.01),
    LossConfig(divergence="jsd", beta=0.1, pointwise_clip=0.002, token_clip=0.2),
    LossConfig(divergence="forward_kl", pointwise_clip=0.02, temperature=0.7),
    LossConfig(divergence="reverse_kl", token_clip=0.3),
    LossConfig(divergence="sampled_pg", token_clip=0.5),
    LossConfig(divergence="jsd", top_k=V),  # k >= V is the full vocabulary
]


@pytest.mark.parametrize("cfg", MODES + VARIANTS, ids=_cfg_id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_autograd(cfg, dtype):
    _check(cfg, dtype)


@pytest.mark.parametrize("cfg", MODES, ids=_cfg_id)
def test_extreme_logits_stay_finite_and_match(cfg):
    # Spread 40: log-probabilities far below -88, where exp underflows in fp32; the JSD's
    # (1-beta) T + beta S over M must not become 0/0.
    out, grad = _check(cfg, torch.float32, spread=40.0, rtol=1e-4)
    assert torch.isfinite(grad).all() and torch.isfinite(out.loss_N).all()


def test_clips_actually_bind():
    cfg = LossConfig(divergence="jsd", pointwise_clip=0.01, token_clip=0.05)
    out, grad = _check(cfg)
    assert 0 < float(out.clipped_N.mean()) < 1
    rows_over = out.loss_N == 0.05  # the token clip bound (on the point-wise clipped sum)
    assert rows_over.any() and (~rows_over).any()
    assert (grad[rows_over] == 0).all() and (grad[~rows_over] != 0).any(-1).all()


def test_gradient_rows_sum_to_zero():
    # Softmax invariance: adding a constant to a row's logits changes nothing.
    for cfg in MODES:
        _, grad = _check(cfg)
        torch.testing.assert_close(
            grad.sum(-1), torch.zeros(N, dtype=grad.dtype), atol=1e-12, rtol=0
        )


def test_top_k_is_refused_and_reported():
    assert has_closed_form(LossConfig(top_k=0), V)
    assert has_closed_form(LossConfig(top_k=V), V)
    assert not has_closed_form(LossConfig(top_k=5), V)
    s, t, ids = _logits(torch.float32)
    with pytest.raises(ValueError, match="top_k=5"):
        divergence_and_grad(s, t, ids, LossConfig(top_k=5))


def test_sampled_pg_needs_ids():
    s, t, _ = _logits(torch.float32)
    with pytest.raises(ValueError, match="sampled token ids"):
        divergence_and_grad(s, t, None, LossConfig(divergence="sampled_pg"))


def test_empty_chunk():
    s, t, ids = _logits(torch.float32, n=0)
    out, grad = divergence_and_grad(s, t, ids, LossConfig())
    assert grad.shape == (0, V) and out.loss_N.shape == (0,)


def test_inputs_are_left_untouched():
    s, t, ids = _logits(torch.float32)
    s0, t0 = s.clone(), t.clone()
    for cfg in MODES + VARIANTS:
        divergence_and_grad(s, t, ids, cfg)
    assert torch.equal(s, s0) and torch.equal(t, t0)
