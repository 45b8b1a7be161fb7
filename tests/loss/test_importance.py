"""loss.importance_clip: hand-computed truncated importance weights, TRL's semantics, and the
weighted loss's gradient on the naive and the fused path against the definition."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from opsd_mm.config import LossConfig
from opsd_mm.loss.divergences import token_divergence
from opsd_mm.loss.fused import fused_divergence
from opsd_mm.loss.importance import importance_weights, weighted_loss_sum


def test_weights_by_hand():
    trainer = torch.tensor([math.log(0.5), math.log(0.2), math.log(0.9), math.log(0.3)])
    rollout = torch.tensor([math.log(0.25), math.log(0.4), math.log(0.1), float("nan")])
    w = importance_weights(trainer, rollout, clip=2.0)
    # 0.5/0.25 = 2 (at the clip), 0.2/0.4 = 0.5 (below 1 kept), 0.9/0.1 = 9 -> 2, NaN -> 1.
    torch.testing.assert_close(w, torch.tensor([2.0, 0.5, 2.0, 1.0]))
    assert not w.requires_grad


def test_matches_trl_formula():
    g = torch.Generator().manual_seed(0)
    trainer, rollout = torch.randn(50, generator=g) * 3, torch.randn(50, generator=g) * 3
    trainer[0], rollout[0] = 30.0, -30.0  # the +-20 log-ratio clamp
    # trl.experimental.sdft.loss_utils.apply_importance_sampling_clipping (1.16.0), inlined.
    trl = torch.exp((trainer - rollout).clamp(-20.0, 20.0)).clamp(max=1.5)
    torch.testing.assert_close(importance_weights(trainer, rollout, 1.5), trl)


def test_weighted_sum_off_is_plain_sum():
    loss_N = torch.tensor([1.0, 2.0])
    lp = torch.zeros(2)
    assert weighted_loss_sum(loss_N, lp, None, 2.0) == 3.0
    assert weighted_loss_sum(loss_N, lp, lp - 1, None) == 3.0


def _data(n=13, v=37, h=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        s_h=torch.randn(n, h, generator=g),
        t_h=torch.randn(n, h, generator=g),
        w=torch.randn(v, h, generator=g) * 0.5,
        ids=torch.randint(0, v, (n,), generator=g),
        # Rollout log-probs around the student's: some weights above the clip, some below 1.
        noise=torch.randn(n, generator=g),
    )


def _reference(d, cfg, rollout_N, scale):
    """From the definition: sum_n w_n loss_n, w from detached log-probs recomputed here."""
    w = d["w"].clone().requires_grad_(True)
    s_h = d["s_h"].clone().requires_grad_(True)
    s_logits = F.linear(s_h, w)
    out = token_divergence(s_logits, F.linear(d["t_h"], w).detach(), d["ids"], cfg)
    lp_N = s_logits.detach().log_softmax(-1).gather(-1, d["ids"][:, None])[:, 0]
    ratio = torch.exp(lp_N - rollout_N).clamp(max=cfg.importance_clip)
    ratio = torch.where(rollout_N.isnan(), torch.ones_like(ratio), ratio)
    loss = (out.loss_N * ratio).sum() * scale
    loss.backward()
    return loss.detach(), s_h.grad, w.grad, ratio


@pytest.mark.parametrize("divergence", ["jsd", "reverse_kl", "sampled_pg"])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_naive_and_fused_match_definition(divergence, chunk_size):
    cfg = dataclasses.replace(LossConfig(divergence=divergence), importance_clip=1.3)
    d = _data()
    s_lp = F.linear(d["s_h"], d["w"]).log_softmax(-1).gather(-1, d["ids"][:, None])[:, 0]
    rollout_N = s_lp + d["noise"]
    rollout_N[2] = float("nan")
    scale = 1 / 13
    ref_loss, ref_gh, ref_gw, ratio = _reference(d, cfg, rollout_N, scale)
    assert (ratio == 1.3).any() and (ratio < 1).any()  # both regimes exercised

    # naive: the trainer's call site (scale * weighted_loss_sum over token_divergence)
    w = d["w"].clone().requires_grad_(True)
    s_h = d["s_h"].clone().requires_grad_(True)
    out = token_divergence(F.linear(s_h, w), F.linear(d["t_h"], w).detach(), d["ids"], cfg)
    loss = scale * weighted_loss_sum(
        out.loss_N, out.student_logprob_N, rollout_N, cfg.importance_clip
    )
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss)
    torch.testing.assert_close(s_h.grad, ref_gh)
    torch.testing.assert_close(w.grad, ref_gw)

    # fused, chunked
    w = d["w"].clone().requires_grad_(True)
    s_h = d["s_h"].clone().requires_grad_(True)
    loss, stats = fused_divergence(
        s_h,
        d["t_h"],
        w,
        d["ids"],
        cfg,
        scale=scale,
        chunk_size=chunk_size,
        rollout_logprob_N=rollout_N,
    )
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss)
    torch.testing.assert_close(s_h.grad, ref_gh)
    torch.testing.assert_close(w.grad, ref_gw)
    # stats stay unweighted (metrics)
    torch.testing.assert_close(stats.loss_N, out.loss_N.detach())


def test_fused_without_rollout_logprobs_is_unweighted():
    cfg = dataclasses.replace(LossConfig(), importance_clip=1.3)
    d = _data()
    plain, _ = fused_divergence(d["s_h"], d["t_h"], d["w"], d["ids"], LossConfig(), chunk_size=4)
    off, _ = fused_divergence(d["s_h"], d["t_h"], d["w"], d["ids"], cfg, chunk_size=4)
    torch.testing.assert_close(plain, off)


def test_importance_metrics_hand_values():
    from opsd_mm.loss.importance import importance_metrics

    # ratios p_trainer / p_rollout: 0.5, 1, 4, and 1 for the token without a rollout log-prob
    trainer_N = torch.log(torch.tensor([0.1, 0.3, 0.8, 0.2]))
    rollout_N = torch.log(torch.tensor([0.2, 0.3, 0.2, float("nan")]))
    m = importance_metrics(trainer_N, rollout_N, clip=2.0)
    assert m["importance/weight_mean"] == pytest.approx((0.5 + 1 + 2 + 1) / 4)
    assert m["importance/clip_fraction"] == 0.25  # only the ratio 4 exceeds the clip
    assert m["importance/ratio_max"] == pytest.approx(4.0)
    empty = importance_metrics(torch.zeros(0), torch.zeros(0), clip=2.0)
    assert all(math.isnan(v) for v in empty.values())
