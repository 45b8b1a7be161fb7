"""The naive divergences against hand-computed values (explicit formulas with math.log on small
probability vectors), plus gradients, masking, accumulation, clipping and dtypes.

Logits are chosen as log-probabilities, so log_softmax(logits) is the probability vector itself
(up to rounding) and every expected number below is a formula over the vectors written here.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from opsd_mm.config import LossConfig
from opsd_mm.loss.divergences import (
    DivergenceOut,
    loss_mask,
    loss_temperature,
    reduce_loss,
    token_divergence,
)

# Two tokens over a 3-entry vocabulary: teacher T, student S.
T_3 = [[0.7, 0.2, 0.1], [0.15, 0.05, 0.8]]
S_3 = [[0.2, 0.5, 0.3], [0.3, 0.4, 0.3]]
# Two tokens over a 4-entry vocabulary, for top-k (teacher's top-2: {0, 1} and {3, 2}).
T_4 = [[0.6, 0.25, 0.1, 0.05], [0.05, 0.15, 0.3, 0.5]]
S_4 = [[0.3, 0.3, 0.2, 0.2], [0.4, 0.1, 0.2, 0.3]]

MODES = [
    LossConfig(divergence="forward_kl"),
    LossConfig(divergence="reverse_kl"),
    LossConfig(divergence="jsd", beta=0.0),
    LossConfig(divergence="jsd", beta=0.3),
    LossConfig(divergence="jsd", beta=1.0),
    LossConfig(divergence="jsd", beta=0.5, top_k=2),
    LossConfig(divergence="jsd", beta=0.5, top_k=2, top_k_tail_bucket=True),
    LossConfig(divergence="forward_kl", pointwise_clip=0.05),
    LossConfig(divergence="reverse_kl", token_clip=0.2),
    LossConfig(divergence="jsd", beta=0.7, temperature=1.3),
    LossConfig(divergence="sampled_pg"),
    LossConfig(divergence="sampled_pg", token_clip=0.1, temperature=0.7),
]


def _cfg_id(cfg: LossConfig) -> str:
    """The non-default fields, for readable test ids."""
    changed = [
        f"{f.name}={getattr(cfg, f.name)}"
        for f in dataclasses.fields(cfg)
        if getattr(cfg, f.name) != f.default
    ]
    return ",".join(changed) or "default"


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def _ent(p):
    return -sum(pi * math.log(pi) for pi in p)


def _gen_jsd(t, s, beta):
    """GKD's generalized JSD (arXiv 2306.13649, Eq. 1), as the OPSD reference and TRL weight it."""
    m = [beta * ti + (1 - beta) * si for ti, si in zip(t, s)]
    return beta * _kl(t, m) + (1 - beta) * _kl(s, m)


def _renorm(p):
    z = sum(p)
    return [pi / z for pi in p]


def _topk_ids(p, k):
    return sorted(range(len(p)), key=lambda i: -p[i])[:k]


def _logits(rows, dtype=torch.float64):
    return torch.tensor([[math.log(x) for x in r] for r in rows], dtype=dtype)


def _run(cfg, t_rows=T_3, s_rows=S_3, ids=None, dtype=torch.float64) -> DivergenceOut:
    return token_divergence(_logits(s_rows, dtype), _logits(t_rows, dtype), ids, cfg)


def _close(actual, expected, tol=1e-9):
    assert actual.tolist() == pytest.approx(expected, abs=tol, rel=tol)


# ----------------------------------------------------------------------------- hand values


def test_forward_kl_hand():
    out = _run(LossConfig(divergence="forward_kl"))
    _close(out.loss_N, [_kl(t, s) for t, s in zip(T_3, S_3)])
    _close(out.div_N, [_kl(t, s) for t, s in zip(T_3, S_3)])
    _close(out.student_entropy_N, [_ent(s) for s in S_3])
    _close(out.teacher_entropy_N, [_ent(t) for t in T_3])
    assert out.clipped_N.tolist() == [0.0, 0.0]


def test_reverse_kl_hand():
    out = _run(LossConfig(divergence="reverse_kl"))
    _close(out.loss_N, [_kl(s, t) for t, s in zip(T_3, S_3)])


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_hand(beta):
    out = _run(LossConfig(divergence="jsd", beta=beta))
    _close(out.loss_N, [_gen_jsd(t, s, beta) for t, s in zip(T_3, S_3)])


def test_jsd_half_is_textbook_jsd():
    expected = []
    for t, s in zip(T_3, S_3):
        m = [(a + b) / 2 for a, b in zip(t, s)]
        expected.append(0.5 * _kl(t, m) + 0.5 * _kl(s, m))
    _close(_run(LossConfig(divergence="jsd", beta=0.5)).loss_N, expected)


def test_jsd_endpoints_exact_and_special_cased():
    """beta 0 / 1 are exactly forward / reverse KL; next to them the GKD weighting tends to 0
    (the reference special-cases the ends for this reason), so the limit is not the endpoint."""
    fwd = _run(LossConfig(divergence="forward_kl"), dtype=torch.float32).loss_N
    rev = _run(LossConfig(divergence="reverse_kl"), dtype=torch.float32).loss_N
    assert torch.equal(_run(LossConfig(beta=0.0), dtype=torch.float32).loss_N, fwd)
    assert torch.equal(_run(LossConfig(beta=1.0), dtype=torch.float32).loss_N, rev)
    near0 = _run(LossConfig(beta=1e-4)).loss_N
    near1 = _run(LossConfig(beta=1 - 1e-4)).loss_N
    assert (near0.abs() < 1e-3 * fwd.double()).all()
    assert (near1.abs() < 1e-3 * rev.double()).all()
    _close(near0, [_gen_jsd(t, s, 1e-4) for t, s in zip(T_3, S_3)])


def test_sampled_pg_hand_value_and_gradient():
    ids = torch.tensor([0, 2])
    s_logits = _logits(S_3).requires_grad_()
    out = token_divergence(s_logits, _logits(T_3), ids, LossConfig(divergence="sampled_pg"))
    exp_loss, exp_div, exp_grad = [], [], []
    for t, s, y in zip(T_3, S_3, ids.tolist()):
        adv = math.log(t[y]) - math.log(s[y])
        exp_loss.append(-adv * math.log(s[y]))
        exp_div.append(-adv)
        # d(-A log s_y)/d logits = -A (onehot_y - s)
        exp_grad.append([-adv * ((1.0 if v == y else 0.0) - s[v]) for v in range(3)])
    _close(out.loss_N, exp_loss)
    _close(out.div_N, exp_div)
    out.loss_N.sum().backward()
    _close(s_logits.grad.flatten(), [g for row in exp_grad for g in row])


def test_sampled_pg_gradient_is_reverse_kl_gradient_in_expectation():
    # Averaging the per-sample gradient over y ~ S (exactly, by enumeration) gives the gradient
    # of KL(S || T): the score-function identity the policy-gradient surrogate relies on.
    torch.manual_seed(0)
    s_logits = torch.randn(1, 6, dtype=torch.float64)
    t_logits = torch.randn(1, 6, dtype=torch.float64)
    probs = torch.softmax(s_logits, -1)[0]
    expected = torch.zeros_like(s_logits)
    for y in range(6):
        x = s_logits.clone().requires_grad_()
        out = token_divergence(x, t_logits, torch.tensor([y]), LossConfig(divergence="sampled_pg"))
        out.loss_N.sum().backward()
        expected += probs[y] * x.grad
    x = s_logits.clone().requires_grad_()
    token_divergence(x, t_logits, None, LossConfig(divergence="reverse_kl")).loss_N.sum().backward()
    torch.testing.assert_close(expected, x.grad)


def test_top_k_renormalised_hand():
    cfg = LossConfig(divergence="forward_kl", top_k=2)
    expected = []
    for t, s in zip(T_4, S_4):
        keep = _topk_ids(t, 2)
        expected.append(_kl(_renorm([t[i] for i in keep]), _renorm([s[i] for i in keep])))
    _close(_run(cfg, T_4, S_4).loss_N, expected)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
def test_top_k_tail_bucket_hand(divergence, beta):
    cfg = LossConfig(divergence=divergence, beta=beta, top_k=2, top_k_tail_bucket=True)
    expected = []
    for t, s in zip(T_4, S_4):
        keep = _topk_ids(t, 2)
        tb = [t[i] for i in keep] + [1 - sum(t[i] for i in keep)]
        sb = [s[i] for i in keep] + [1 - sum(s[i] for i in keep)]
        expected.append(_kl(tb, sb) if divergence == "forward_kl" else _gen_jsd(tb, sb, beta))
    _close(_run(cfg, T_4, S_4).loss_N, expected)


def test_tail_bucket_stays_finite_when_top_k_holds_all_mass():
    # Teacher puts (numerically) all mass on token 0: its tail mass rounds to 0 in fp32.
    s = torch.tensor([[0.0, 1.0, 2.0, -1.0]], requires_grad=True)
    t = torch.tensor([[60.0, 0.0, 0.0, 0.0]])
    cfg = LossConfig(divergence="jsd", top_k=1, top_k_tail_bucket=True)
    out = token_divergence(s, t, None, cfg)
    out.loss_N.sum().backward()
    assert torch.isfinite(out.loss_N).all() and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("divergence", ["jsd", "forward_kl", "reverse_kl"])
def test_top_k_at_least_vocab_equals_full(divergence, tail):
    full = _run(LossConfig(divergence=divergence), T_4, S_4, dtype=torch.float32)
    for k in (4, 9):
        cfg = LossConfig(divergence=divergence, top_k=k, top_k_tail_bucket=tail)
        # k >= V takes the full-vocabulary path itself: the same computation, so exactly.
        assert torch.equal(_run(cfg, T_4, S_4, dtype=torch.float32).loss_N, full.loss_N)


# ----------------------------------------------------------------------------- clipping


def test_pointwise_clip_forward_kl_hand():
    # Terms of token 0: 0.7 log 3.5 = 0.877, 0.2 log 0.4 = -0.183, 0.1 log(1/3) = -0.110.
    c = 0.5
    out = _run(LossConfig(divergence="forward_kl", pointwise_clip=c))
    expected, frac = [], []
    for t, s in zip(T_3, S_3):
        terms = [ti * math.log(ti / si) for ti, si in zip(t, s)]
        expected.append(sum(min(x, c) for x in terms))
        frac.append(sum(x > c for x in terms) / len(terms))
    _close(out.loss_N, expected)
    _close(out.div_N, [_kl(t, s) for t, s in zip(T_3, S_3)])  # metrics stay unclipped
    _close(out.clipped_N, frac)
    assert frac == [1 / 3, 1 / 3]


def test_pointwise_clip_jsd_hand_and_zero_gradient_on_clipped_terms():
    beta, c = 0.3, 0.02
    s_logits = _logits(S_3).requires_grad_()
    out = token_divergence(s_logits, _logits(T_3), None, LossConfig(beta=beta, pointwise_clip=c))
    expected, frac = [], []
    for t, s in zip(T_3, S_3):
        m = [beta * a + (1 - beta) * b for a, b in zip(t, s)]
        terms = [
            beta * a * math.log(a / mi) + (1 - beta) * b * math.log(b / mi)
            for a, b, mi in zip(t, s, m)
        ]
        expected.append(sum(min(x, c) for x in terms))
        frac.append(sum(x > c for x in terms) / 3)
    _close(out.loss_N, expected)
    _close(out.clipped_N, frac)
    # Clipping every term leaves no gradient at all.
    s2 = _logits(S_3).requires_grad_()
    out2 = token_divergence(
        s2, _logits(T_3), None, LossConfig(divergence="reverse_kl", pointwise_clip=-1.0)
    )
    out2.loss_N.sum().backward()
    assert out2.clipped_N.tolist() == [1.0, 1.0]
    assert torch.count_nonzero(s2.grad) == 0


def test_token_clip_hand():
    c = 0.2
    s_logits = _logits(S_3).requires_grad_()
    out = token_divergence(
        s_logits, _logits(T_3), None, LossConfig(divergence="forward_kl", token_clip=c)
    )
    kls = [_kl(t, s) for t, s in zip(T_3, S_3)]
    assert kls[0] > c and kls[1] > c
    _close(out.loss_N, [c, c])
    _close(out.div_N, kls)
    assert out.clipped_N.tolist() == [1.0, 1.0]
    out.loss_N.sum().backward()
    assert torch.count_nonzero(s_logits.grad) == 0
    out = _run(LossConfig(divergence="forward_kl", token_clip=1.0))
    _close(out.loss_N, kls)
    assert out.clipped_N.tolist() == [0.0, 0.0]


def test_sampled_pg_token_clip_caps_the_advantage():
    ids = torch.tensor([1, 0])  # log s_y - log t_y: log(0.5/0.2) = 0.92, log(0.3/0.15) = 0.69
    c = 0.8
    out = _run(LossConfig(divergence="sampled_pg", token_clip=c), ids=ids)
    expected = []
    for t, s, y in zip(T_3, S_3, ids.tolist()):
        d = math.log(s[y]) - math.log(t[y])
        expected.append(min(d, c) * math.log(s[y]))  # -A log s_y with A = -min(d, c)
    _close(out.loss_N, expected)
    assert out.clipped_N.tolist() == [1.0, 0.0]


def test_sampled_pg_rejects_pointwise_clip_and_top_k():
    with pytest.raises(ValueError, match="loss.pointwise_clip"):
        _run(LossConfig(divergence="sampled_pg", pointwise_clip=0.05), ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="loss.top_k"):
        _run(LossConfig(divergence="sampled_pg", top_k=2), ids=torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"beta": 1.5}, "loss.beta"),
        ({"temperature": 0.0}, "loss.temperature"),
        ({"top_k": -1}, "loss.top_k"),
        ({"divergence": "kl"}, "loss.divergence"),
    ],
)
def test_bad_config_names_the_key(kwargs, key):
    """A LossConfig the loss cannot compute cannot be made (checked once, at construction)."""
    with pytest.raises(ValueError, match=key):
        LossConfig(**kwargs)


# ----------------------------------------------------------------------------- temperature


@pytest.mark.parametrize("tau", [0.7, 1.3])
def test_temperature_hand(tau):
    def at_tau(p):
        return _renorm([pi ** (1 / tau) for pi in p])

    out = _run(LossConfig(divergence="forward_kl", temperature=tau))
    _close(out.loss_N, [_kl(at_tau(t), at_tau(s)) for t, s in zip(T_3, S_3)])
    _close(out.student_entropy_N, [_ent(at_tau(s)) for s in S_3])
    ids = torch.tensor([2, 1])
    out = _run(LossConfig(divergence="sampled_pg", temperature=tau), ids=ids)
    _close(out.div_N, [math.log(at_tau(s)[y] / at_tau(t)[y]) for t, s, y in zip(T_3, S_3, [2, 1])])


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("cfg", [c for c in MODES if c.divergence != "sampled_pg"], ids=_cfg_id)
def test_gradcheck_float64(cfg):
    torch.manual_seed(0)
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64)
    if cfg.pointwise_clip is not None or cfg.token_clip is not None:
        # Some terms are clipped, some not, none at the kink (finite differences need smoothness).
        out = token_divergence(s, t, None, cfg)
        assert 0 < out.clipped_N.sum() < 3
    assert torch.autograd.gradcheck(lambda x: token_divergence(x, t, None, cfg).loss_N, (s,))


@pytest.mark.parametrize("cfg", [c for c in MODES if c.divergence == "sampled_pg"], ids=_cfg_id)
def test_sampled_pg_gradient_by_finite_differences(cfg):
    # The surrogate's advantage is detached, so plain gradcheck does not apply: its gradient must
    # equal the finite-difference derivative of -A0 * log p_s(y) with A0 frozen at the base
    # point. log p_s(y) is read back from div_N = log p_s(y) - log p_t(y).
    torch.manual_seed(0)
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64)
    ids = torch.tensor([0, 3, 4])
    out = token_divergence(s, t, ids, cfg)
    if cfg.token_clip is not None:
        assert 0 < out.clipped_N.sum() < 3
    (analytical,) = torch.autograd.grad(out.loss_N.sum(), s)
    log_t_y = torch.log_softmax(t / loss_temperature(cfg), -1).gather(-1, ids[:, None]).squeeze(-1)
    cost0 = out.div_N if cfg.token_clip is None else out.div_N.clamp(max=cfg.token_clip)

    def frozen_surrogate(x):
        log_s_y = token_divergence(x, t, ids, cfg).div_N + log_t_y
        return (cost0 * log_s_y).sum()

    numerical = torch.zeros_like(s)
    eps = 1e-6
    for i in range(s.numel()):
        d = torch.zeros_like(s).flatten()
        d[i] = eps
        d = d.view_as(s)
        numerical.view(-1)[i] = (frozen_surrogate(s + d) - frozen_surrogate(s - d)) / (2 * eps)
    torch.testing.assert_close(analytical, numerical, rtol=1e-6, atol=1e-8)


def test_teacher_gets_no_gradient():
    s = torch.randn(2, 5, requires_grad=True)
    t = torch.randn(2, 5, requires_grad=True)
    out = token_divergence(s, t, None, LossConfig())
    out.loss_N.sum().backward()
    assert t.grad is None and s.grad is not None


# ----------------------------------------------------------------------------- masks, reduce


def test_loss_mask_skips_first_tokens_of_each_row():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    expected = [[0, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    got = loss_mask(mask, 2)
    assert got.dtype == torch.bool and got.int().tolist() == expected
    assert loss_mask(mask, 0).int().tolist() == mask.tolist()
    assert loss_mask(mask, 1).int().tolist()[0] == [0, 1, 1, 1, 0]


def test_skip_first_tokens_end_to_end():
    torch.manual_seed(0)
    mask_BC = torch.tensor([[1, 1, 1], [1, 1, 0]])
    s_BCV, t_BCV = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    sel = loss_mask(mask_BC, skip_first_tokens=1)
    out = token_divergence(s_BCV[sel], t_BCV[sel], None, LossConfig())
    full = token_divergence(s_BCV.flatten(0, 1), t_BCV.flatten(0, 1), None, LossConfig())
    torch.testing.assert_close(out.loss_N, full.loss_N[[1, 2, 4]])


@pytest.mark.parametrize("cfg", MODES, ids=_cfg_id)
def test_all_masked_gives_exact_zero_and_finite_grads(cfg):
    s = torch.randn(0, 7, requires_grad=True)
    out = token_divergence(s, torch.randn(0, 7), torch.zeros(0, dtype=torch.long), cfg)
    loss = reduce_loss(out.loss_N, 0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    for x in (out.div_N, out.clipped_N, out.student_entropy_N, out.teacher_entropy_N):
        assert x.shape == (0,)


ACCUMULATION = [
    LossConfig(divergence="forward_kl"),
    LossConfig(divergence="jsd", top_k=2, top_k_tail_bucket=True, pointwise_clip=0.05),
    LossConfig(divergence="sampled_pg", token_clip=0.5),
]


@pytest.mark.parametrize("cfg", ACCUMULATION, ids=_cfg_id)
def test_micro_batch_accumulation_equals_one_batch(cfg):
    torch.manual_seed(0)
    s = torch.randn(10, 6, requires_grad=True)
    t = torch.randn(10, 6)
    ids = torch.randint(0, 6, (10,))
    whole = reduce_loss(token_divergence(s, t, ids, cfg).loss_N, 10)
    (g_whole,) = torch.autograd.grad(whole, s)
    parts = [
        reduce_loss(token_divergence(s[a:b], t[a:b], ids[a:b], cfg).loss_N, 10)
        for a, b in ((0, 4), (4, 10))
    ]
    g_parts = sum(torch.autograd.grad(p, s)[0] for p in parts)
    torch.testing.assert_close(parts[0] + parts[1], whole)
    torch.testing.assert_close(g_parts, g_whole)


def test_reduce_loss_divides_by_global_count():
    loss_N = torch.tensor([1.0, 2.0, 3.0])
    assert reduce_loss(loss_N, 12).item() == pytest.approx(0.5)
    assert reduce_loss(loss_N, torch.tensor(6)).item() == pytest.approx(1.0)
    assert reduce_loss(torch.zeros(0), 0).item() == 0.0


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("cfg", MODES, ids=_cfg_id)
def test_bf16_inputs_give_fp32_outputs(cfg):
    torch.manual_seed(0)
    s = torch.randn(4, 9).bfloat16().requires_grad_()
    t = torch.randn(4, 9).bfloat16()
    ids = torch.tensor([0, 1, 2, 8])
    out = token_divergence(s, t, ids, cfg)
    for x in (getattr(out, f.name) for f in dataclasses.fields(out)):
        assert x.dtype == torch.float32
    ref = token_divergence(s.detach().float(), t.float(), ids, cfg)
    torch.testing.assert_close(out.loss_N, ref.loss_N)
    out.loss_N.sum().backward()
    assert s.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_student_logprob_is_raw_sampled_token_logprob(temperature):
    """The rollout/trainer gap compares temperature-1 log p_s(y), whatever the loss temperature."""
    torch.manual_seed(0)
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    ids = torch.tensor([0, 3, 6, 2])
    cfg = LossConfig(temperature=temperature)
    out = token_divergence(s, t, ids, cfg)
    expected = torch.log_softmax(s, -1)[torch.arange(4), ids]
    assert torch.allclose(out.student_logprob_N, expected, atol=1e-6)
    assert torch.isnan(token_divergence(s, t, None, cfg).student_logprob_N).all()
