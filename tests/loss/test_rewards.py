"""Group-normalised advantages and the policy-gradient term (opsd_mm.loss.rewards,
opsd_mm.loss.policy_gradient), against hand computations and the naive path."""

import math

import pytest
import torch

from opsd_mm.loss.policy_gradient import pg_loss_N, sampled_logprob, sampled_logprob_fused
from opsd_mm.loss.rewards import ADVANTAGE_EPS, RewardScore, group_advantages, reward_metrics


def test_group_advantages_by_hand():
    r_PG = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    adv_PG, zero_P = group_advantages(r_PG)
    # group 0: mean 1/2, sample std sqrt((4 * 1/4) / 3) = sqrt(1/3)
    s0 = math.sqrt(1 / 3) + ADVANTAGE_EPS
    # group 1: mean 1/4, squared deviations 3 * 1/16 + 9/16 = 3/4, / 3 -> std 1/2
    s1 = 0.5 + ADVANTAGE_EPS
    want = torch.tensor(
        [[0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0], [-0.25 / s1] * 3 + [0.75 / s1]]
    )
    assert torch.allclose(adv_PG, want, atol=1e-6)
    assert not zero_P.any()


def test_group_advantages_match_trl_group_scaling():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    r_PG = torch.tensor([[0.2, 0.9, 0.4], [1.0, 0.0, 0.5]])
    mean = r_PG.mean(1, keepdim=True)
    std = trl_utils.nanstd(r_PG, dim=1).unsqueeze(1)  # TRL's scale_rewards="group"
    adv_PG, _ = group_advantages(r_PG)
    assert torch.allclose(adv_PG, (r_PG - mean) / (std + 1e-4), atol=1e-6)


def test_zero_variance_groups_are_zero_and_counted():
    r_PG = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    adv_PG, zero_P = group_advantages(r_PG)
    assert zero_P.tolist() == [True, True, False]
    assert torch.equal(adv_PG[:2], torch.zeros(2, 3))
    scores = [RewardScore(v) for v in r_PG.flatten().tolist()]
    scores[1] = RewardScore(0.0, "timeout")
    m = reward_metrics(r_PG, zero_P, scores)
    assert m["reward/zero_variance_groups"] == pytest.approx(2 / 3)
    assert m["reward/mean"] == pytest.approx(4 / 9)
    assert m["reward/failed_timeout"] == 1 and m["reward/failed_no_answer"] == 0
    # one sample per prompt: no comparison, advantage 0
    adv_P1, zero_P1 = group_advantages(torch.tensor([[1.0], [0.0]]))
    assert torch.equal(adv_P1, torch.zeros(2, 1)) and zero_P1.all()


def test_pg_gradient_by_hand():
    """d/dz of -A log softmax(z / tau)[y] = -A (onehot(y) - softmax(z / tau)) / tau."""
    z_NV = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]], requires_grad=True)
    ids_N = torch.tensor([2, 0])
    adv_N = torch.tensor([0.7, -1.3])
    tau = 0.8
    pg_loss_N(sampled_logprob(z_NV, ids_N, tau), adv_N).sum().backward()
    p_NV = torch.softmax(z_NV.detach() / tau, -1)
    want = -adv_N[:, None] * (torch.nn.functional.one_hot(ids_N, 3) - p_NV) / tau
    assert torch.allclose(z_NV.grad, want, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_fused_logprob_matches_naive(chunk):
    g = torch.Generator().manual_seed(0)
    h_NH = torch.randn(7, 5, generator=g, requires_grad=True)
    w_VH = torch.randn(11, 5, generator=g, requires_grad=True)
    b_V = torch.randn(11, generator=g, requires_grad=True)
    ids_N = torch.randint(0, 11, (7,), generator=g)
    adv_N = torch.randn(7, generator=g)
    grads = []
    for fused in (False, True):
        for t in (h_NH, w_VH, b_V):
            t.grad = None
        if fused:
            lp = sampled_logprob_fused(
                h_NH, w_VH, ids_N, bias_V=b_V, temperature=0.7, chunk_size=chunk
            )
        else:
            lp = sampled_logprob(h_NH @ w_VH.T + b_V, ids_N, 0.7)
        pg_loss_N(lp, adv_N).sum().backward()
        grads.append((lp.detach(), h_NH.grad.clone(), w_VH.grad.clone(), b_V.grad.clone()))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_fused_logprob_empty_still_backpropagates():
    h = torch.zeros(0, 4, requires_grad=True)
    w = torch.randn(6, 4, requires_grad=True)
    out = sampled_logprob_fused(h, w, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
    out.sum().backward()
    assert h.grad is not None
