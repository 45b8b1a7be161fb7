"""The Triton kernel of ``loss.kernel=triton`` against the naive reference (materialised logits
-> ``token_divergence`` -> autograd): per-token stats and logit gradients on one chunk, every
mode and support; then through ``fused_divergence`` from hidden states (lm_head weight and bias
gradients, importance weights, a teacher head of its own, a teacher scored on the server), and
on ragged completion masks with a fully masked row and an all-masked micro-batch.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``,
set before the kernel module is first imported); the interpreter is slow, so the shapes are
tiny (V = 151, 5-13 tokens) and the V tiles small (32 and 64 entries) so that every pass
crosses tile edges and ends on a ragged tile. On a CUDA machine the same tests run compiled
(``bench/gpu_checks.sh``). Skipped only where Triton does not import.

Tolerances, both paths computing in fp32 from the same logits: stats 2e-5 (absolute, on losses
of ~0.1-1 and entropies of ~3: a few fp32 ulps; the online log-sum-exp rescales partial sums in
another order than torch's log_softmax); fp32 gradients 1e-5 of their largest entry. bf16
logits: the gradient is rounded to bf16 by both paths (round to nearest even), so they agree up
to one bf16 ulp where the fp32 values straddle a rounding boundary: 1% of the largest entry
(2^-7, two ulps of the largest).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from opsd_mm.config import ConfigError, LossConfig
from opsd_mm.errors import UserError
from opsd_mm.loss.divergences import loss_mask, reduce_loss, token_divergence
from opsd_mm.loss.fused import fused_divergence
from opsd_mm.loss.importance import importance_weights
from opsd_mm.loss.kernel import resolve_kernel, triton_chunk
from opsd_mm.loss.modes import MODES
from opsd_mm.types import TeacherLogprobs

pytest.importorskip("triton", reason="the kernel needs Triton (torch's CUDA wheels bring it)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V = 151
BLOCKS = (64, 32)  # V tiles of the stats and gradient kernels: 3 and 5 tiles, the last ragged
STATS = [
    "loss_N",
    "div_N",
    "clipped_N",
    "student_entropy_N",
    "teacher_entropy_N",
    "student_logprob_N",
]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """The kernel module; without a GPU decorated in Triton's interpreter mode, which
    tests/conftest.py selects before anything imports Triton."""
    from opsd_mm.loss import triton_divergence

    if DEVICE == "cpu":
        assert triton_divergence.INTERPRETED, "TRITON_INTERPRET=1 must be set before Triton loads"
    return triton_divergence


def _cfg_id(cfg: LossConfig) -> str:
    changed = [
        f"{f.name}={getattr(cfg, f.name)}"
        for f in dataclasses.fields(cfg)
        if getattr(cfg, f.name) != f.default and f.name != "kernel"
    ]
    return ",".join(changed) or "default"


def T(**kw) -> LossConfig:
    return LossConfig(kernel="triton", **kw)


# Every mode, temperature, support and clip the kernel has a branch for.
CHUNK_CASES = [
    T(divergence="jsd", beta=0.0),
    T(divergence="jsd", beta=0.1),
    T(divergence="jsd", beta=0.5),
    T(divergence="jsd", beta=0.9),
    T(divergence="jsd", beta=1.0),
    T(divergence="forward_kl"),
    T(divergence="reverse_kl"),
    T(divergence="sampled_pg"),
    T(divergence="jsd", temperature=0.7),
    T(divergence="reverse_kl", temperature=1.3),
    T(divergence="sampled_pg", temperature=1.3),
    T(divergence="jsd", top_k=1),
    T(divergence="jsd", top_k=5),
    T(divergence="jsd", top_k=5, top_k_tail_bucket=True),
    T(divergence="forward_kl", top_k=5, top_k_tail_bucket=True, temperature=0.7),
    T(divergence="reverse_kl", top_k=17),
    T(divergence="reverse_kl", top_k=1, top_k_tail_bucket=True),
    T(divergence="jsd", top_k=V),  # k >= V: the full vocabulary, as the reference treats it
    T(divergence="jsd", pointwise_clip=0.01),
    T(divergence="forward_kl", pointwise_clip=0.02, temperature=0.7),
    T(divergence="reverse_kl", token_clip=0.3),
    T(divergence="jsd", beta=0.9, top_k=5, pointwise_clip=0.01, token_clip=0.05),
    T(divergence="jsd", top_k=5, top_k_tail_bucket=True, pointwise_clip=0.02),
    T(divergence="sampled_pg", token_clip=0.5),
]
CLIPPING = [c for c in CHUNK_CASES if c.pointwise_clip is not None or c.token_clip is not None]


def _logits(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g) * 2.5  # peaked enough for top-k and clips to bind
    u = z + 0.8 * torch.randn(n, V, generator=g)
    ids = torch.randint(0, V, (n,), generator=g)
    return z.to(DEVICE, dtype), u.to(DEVICE, dtype), ids.to(DEVICE)


def _reference(z, u, ids, cfg):
    z_ref = z.detach().clone().requires_grad_()
    out = token_divergence(z_ref, u, ids, cfg)
    (grad,) = torch.autograd.grad(out.loss_N.sum(), z_ref)
    return out, grad


def _close(got, want, rel, name):
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(
        got.float(),
        want.float(),
        rtol=0,
        atol=rel * max(scale, 1e-30),
        msg=lambda m: f"{name}: {m}",
    )


def check_chunk(cfg, dtype=torch.float32, n=7, seed=0):
    z, u, ids = _logits(n, dtype, seed)
    out, grad_ref = _reference(z, u, ids, cfg)
    *stats, grad = triton_chunk([z.clone(), u.clone()], ids, cfg, block_v=BLOCKS)
    for name, got in zip(STATS, stats):
        want = getattr(out, name).detach()
        assert got.dtype == torch.float32 and got.shape == (n,), name
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5, msg=lambda m, k=name: f"{k}: {m}")
    assert grad.dtype == dtype and grad.shape == (n, V)
    _close(grad, grad_ref, 1e-5 if dtype == torch.float32 else 1e-2, "grad")
    return stats


@pytest.mark.parametrize("cfg", CHUNK_CASES, ids=_cfg_id)
def test_chunk_matches_reference_fp32(cfg):
    check_chunk(cfg)


@pytest.mark.parametrize("cfg", CLIPPING, ids=_cfg_id)
def test_clips_bind_on_some_tokens(cfg):
    # A clip that binds on no token (or on all) would prove little above.
    stats = check_chunk(cfg, n=11, seed=1)
    clipped = float(stats[STATS.index("clipped_N")].mean())
    assert 0.0 < clipped < 1.0


BF16_CASES = [
    T(divergence="jsd", beta=0.5),
    T(divergence="forward_kl", top_k=5, top_k_tail_bucket=True, temperature=1.3),
    T(divergence="reverse_kl", token_clip=0.3),
    T(divergence="jsd", top_k=5, pointwise_clip=0.01),
    T(divergence="sampled_pg", temperature=0.7),
]


@pytest.mark.parametrize("cfg", BF16_CASES, ids=_cfg_id)
def test_chunk_matches_reference_bf16(cfg):
    check_chunk(cfg, dtype=torch.bfloat16)


def test_bf16_gradient_is_the_fp32_one_rounded_to_nearest():
    # The same logits as bf16 and upcast to fp32 (exact): the kernel does the same fp32 math,
    # so the bf16 gradient must be the fp32 one rounded to nearest even, bit for bit (Triton's
    # interpreter truncates fp32 -> bf16 casts; the kernel rounds itself). On CUDA the two
    # compiled kernels may contract multiply-adds differently: one bf16 ulp there.
    cfg = T(divergence="jsd", beta=0.3, top_k=5, top_k_tail_bucket=True)
    z, u, ids = _logits(7, torch.bfloat16, seed=2)
    *_, g16 = triton_chunk([z.clone(), u.clone()], ids, cfg, block_v=BLOCKS)
    *_, g32 = triton_chunk([z.float(), u.float()], ids, cfg, block_v=BLOCKS)
    want = g32.to(torch.bfloat16)
    if DEVICE == "cpu":
        assert torch.equal(g16, want)
    else:
        torch.testing.assert_close(g16.float(), want.float(), rtol=2**-7, atol=0)


def test_gradient_written_over_the_student_logits_only():
    cfg = T(divergence="jsd")
    z, u, ids = _logits(5, torch.float32)
    u_before = u.clone()
    logits = [z, u]
    *_, grad = triton_chunk(logits, ids, cfg, block_v=BLOCKS)
    assert logits == []  # handed over: the caller keeps no reference
    assert grad.data_ptr() == z.data_ptr()  # in the student logits' memory
    assert torch.equal(u, u_before)


def test_no_grad_chunk_leaves_the_logits():
    cfg = T(divergence="reverse_kl", top_k=5, top_k_tail_bucket=True)
    z, u, ids = _logits(5, torch.float32)
    z_before = z.clone()
    stats = triton_chunk([z, u], ids, cfg, need_grad=False, block_v=BLOCKS)
    assert len(stats) == 6 and torch.equal(z, z_before)


# ----------------------------------------------------------------------------- fused path

H = 24


def _hidden(n, dtype, seed=0, teacher_own=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, H, generator=g) * (2.5 / H**0.5)
    b = torch.randn(V, generator=g) * 0.5
    h = torch.randn(n, H, generator=g)
    ht = h + 0.7 * torch.randn(n, H, generator=g)
    ids = torch.randint(0, V, (n,), generator=g)
    wt = bt = None
    if teacher_own:
        wt = w + 0.3 * torch.randn(V, H, generator=g) / H**0.5
        bt = b + 0.1 * torch.randn(V, generator=g)
    cast = lambda x: None if x is None else x.to(DEVICE, dtype)  # noqa: E731
    d = dict(h=cast(h), ht=cast(ht), w=cast(w), b=cast(b), wt=cast(wt), bt=cast(bt))
    return d | dict(ids=ids.to(DEVICE))


def _leaves(d):
    d = dict(d)
    for k in ("h", "w", "b"):
        d[k] = d[k].detach().clone().requires_grad_()
    return d


def _naive_loss(d, cfg, n_global, rollout_N=None):
    s_logits = F.linear(d["h"], d["w"], d["b"])
    wt, bt = (d["w"], d["b"]) if d["wt"] is None else (d["wt"], d["bt"])
    with torch.no_grad():
        t_logits = F.linear(d["ht"], wt, bt)
    out = token_divergence(s_logits, t_logits, d["ids"], cfg)
    loss_N = out.loss_N
    if rollout_N is not None:
        loss_N = loss_N * importance_weights(out.student_logprob_N, rollout_N, cfg.importance_clip)
    return reduce_loss(loss_N, n_global), out


def _fused_loss(d, cfg, n_global, **kw):
    return fused_divergence(
        d["h"],
        d["ht"],
        d["w"],
        d["ids"],
        cfg,
        bias_V=d["b"],
        teacher_weight_VH=d["wt"],
        teacher_bias_V=d["bt"],
        scale=1.0 / max(n_global, 1),
        chunk_size=4,
        **kw,
    )


FUSED_CASES = [
    T(divergence="jsd", beta=0.3),
    T(divergence="sampled_pg", token_clip=0.5),
    T(divergence="reverse_kl", top_k=5, top_k_tail_bucket=True, pointwise_clip=0.02),
]


@pytest.mark.parametrize("teacher_own", [False, True], ids=["shared-head", "own-head"])
@pytest.mark.parametrize("cfg", FUSED_CASES, ids=_cfg_id)
def test_fused_path_matches_naive(cfg, teacher_own):
    n = 11
    data = _hidden(n, torch.float32, teacher_own=teacher_own)
    dn, df = _leaves(data), _leaves(data)
    loss_n, out_n = _naive_loss(dn, cfg, n)
    grads_n = torch.autograd.grad(loss_n, [dn["h"], dn["w"], dn["b"]])
    loss_f, out_f = _fused_loss(df, cfg, n)
    grads_f = torch.autograd.grad(loss_f, [df["h"], df["w"], df["b"]])
    torch.testing.assert_close(loss_f, loss_n, rtol=1e-5, atol=1e-7)
    for name, gn, gf in zip("hwb", grads_n, grads_f):
        assert gf.dtype == gn.dtype
        _close(gf, gn, 1e-4, name)
    for name in STATS:
        torch.testing.assert_close(
            getattr(out_f, name), getattr(out_n, name).detach(), atol=2e-5, rtol=0
        )


def test_fused_path_bf16_weights_match_naive():
    # bf16 weights: logits and their gradient in bf16 on both paths; the lm_head's gradient
    # accumulated in bf16 over 3 chunks (one rounding per chunk) against the naive path's one
    # GEMM: within 2% of the largest entry, as tests/loss/test_fused.py allows for bf16.
    n = 11
    cfg = T(divergence="jsd", beta=0.5, top_k=5)
    data = _hidden(n, torch.bfloat16)
    dn, df = _leaves(data), _leaves(data)
    loss_n, _ = _naive_loss(dn, cfg, n)
    grads_n = torch.autograd.grad(loss_n, [dn["h"], dn["w"], dn["b"]])
    loss_f, _ = _fused_loss(df, cfg, n)
    grads_f = torch.autograd.grad(loss_f, [df["h"], df["w"], df["b"]])
    torch.testing.assert_close(loss_f, loss_n, rtol=2e-3, atol=1e-7)
    for name, gn, gf in zip("hwb", grads_n, grads_f):
        assert gf.dtype == torch.bfloat16
        _close(gf, gn, 2e-2, name)


def test_importance_weights_fold_into_the_gradient():
    n = 11
    cfg = T(divergence="jsd", importance_clip=1.5)
    data = _hidden(n, torch.float32)
    g = torch.Generator().manual_seed(3)
    rollout_N = torch.randn(n, generator=g).to(DEVICE) - 6.0  # ratios around 1, some clipped
    rollout_N[2] = float("nan")  # unknown: weight 1
    dn, df = _leaves(data), _leaves(data)
    loss_n, _ = _naive_loss(dn, cfg, n, rollout_N)
    grads_n = torch.autograd.grad(loss_n, [dn["h"], dn["w"]])
    loss_f, _ = _fused_loss(df, cfg, n, rollout_logprob_N=rollout_N)
    grads_f = torch.autograd.grad(loss_f, [df["h"], df["w"]])
    torch.testing.assert_close(loss_f, loss_n, rtol=1e-5, atol=1e-7)
    for name, gn, gf in zip("hw", grads_n, grads_f):
        _close(gf, gn, 1e-4, name)


@pytest.mark.parametrize(
    "cfg",
    [T(divergence="sampled_pg"), T(divergence="jsd", top_k=5, top_k_tail_bucket=True)],
    ids=_cfg_id,
)
def test_scored_teacher_matches_naive(cfg):
    # teacher.scoring=server: the teacher's sampled-token or top-k log-probs in place of logits.
    n = 9
    data = _hidden(n, torch.float32)
    with torch.no_grad():
        t_logp = F.log_softmax(F.linear(data["ht"], data["w"], data["b"]), dim=-1)
    top = t_logp.topk(5, dim=-1)
    scored = TeacherLogprobs(
        t_logp.gather(-1, data["ids"][:, None]).squeeze(-1), top.indices, top.values
    )
    dn, df = _leaves(data), _leaves(data)
    out_n = token_divergence(F.linear(dn["h"], dn["w"], dn["b"]), scored, dn["ids"], cfg)
    (gh_n,) = torch.autograd.grad(out_n.loss_N.sum() / n, dn["h"])
    loss_f, out_f = fused_divergence(
        df["h"], None, df["w"], df["ids"], cfg, bias_V=df["b"], scale=1 / n, chunk_size=4,
        teacher_logprobs=scored,
    )  # fmt: skip
    (gh_f,) = torch.autograd.grad(loss_f, df["h"])
    torch.testing.assert_close(out_f.loss_N, out_n.loss_N.detach(), atol=2e-5, rtol=0)
    assert torch.isnan(out_f.teacher_entropy_N).all()
    _close(gh_f, gh_n, 1e-4, "h")


def test_ragged_masks_and_a_fully_masked_row():
    # A micro-batch [B=3, C=6] whose rows hold 6, 0 and 2 loss tokens (the middle one fully
    # masked, e.g. loss.skip_first_tokens past its end): the loss reads only the selected
    # tokens, and the masked positions get exactly zero gradient.
    B, C = 3, 6
    completion_BC = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool
    )
    mask_BC = loss_mask(completion_BC, skip_first_tokens=3).to(DEVICE)
    assert mask_BC.sum(1).tolist() == [3, 0, 2]
    cfg = T(divergence="jsd", beta=0.5, skip_first_tokens=3)
    data = _hidden(B * C, torch.float32)
    grads = {}
    for path in ("naive", "fused"):
        h_BCH = data["h"].view(B, C, H).clone().requires_grad_()
        w = data["w"].clone().requires_grad_()
        d = dict(data, h=h_BCH[mask_BC], ht=data["ht"].view(B, C, H)[mask_BC], w=w)
        d["ids"] = data["ids"].view(B, C)[mask_BC]
        n = int(mask_BC.sum())
        if path == "naive":
            loss, _ = _naive_loss(d, cfg, n)
        else:
            loss, _ = _fused_loss(d, cfg, n)
        grads[path] = torch.autograd.grad(loss, [h_BCH, w])
    for gn, gf in zip(grads["naive"], grads["fused"]):
        _close(gf, gn, 1e-4, "grad")
    gh_BCH = grads["fused"][0]
    assert not gh_BCH[~mask_BC].any() and gh_BCH[mask_BC].abs().sum() > 0
    assert not gh_BCH[1].any()  # the fully masked row


@pytest.mark.parametrize("cfg", [T(divergence="jsd"), T(divergence="sampled_pg")], ids=_cfg_id)
def test_all_masked_micro_batch(cfg):
    d = _leaves(_hidden(0, torch.float32))
    loss, out = _fused_loss(d, cfg, 0)
    assert loss.item() == 0.0 and out.loss_N.shape == (0,)
    for g in torch.autograd.grad(loss, [d["h"], d["w"], d["b"]]):
        assert torch.isfinite(g).all() and not g.any()


def test_weight_gradient_not_kept_twice():
    # The lm_head's gradient is accumulated in one buffer that backward hands over: a second
    # backward through the same loss is refused instead of returning it scaled twice.
    d = _leaves(_hidden(6, torch.float32))
    loss, _ = _fused_loss(d, T(divergence="jsd"), 6)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


# ----------------------------------------------------------------------------- the choice


def test_auto_takes_torch_on_the_cpu_and_triton_says_why_not(monkeypatch):
    cfg = LossConfig()
    assert resolve_kernel(cfg, "cpu", torch.float32)[0] == "torch"
    assert resolve_kernel(LossConfig(kernel="torch"), "cuda", torch.bfloat16)[0] == "torch"
    assert resolve_kernel(cfg, "cuda", torch.bfloat16, compile=True)[0] == "torch"
    assert resolve_kernel(cfg, "cuda", torch.float64)[0] == "torch"
    assert resolve_kernel(cfg, "cuda", torch.bfloat16)[0] == "triton"
    assert resolve_kernel(T(), "cpu", torch.float32)[0] == "triton"  # this module's interpreter
    with pytest.raises(UserError, match="loss.kernel=triton.*float64"):
        resolve_kernel(T(), "cuda", torch.float64)
    monkeypatch.setattr("opsd_mm.loss.kernel._interpreting", lambda: False)
    with pytest.raises(UserError, match="loss.kernel=triton cannot run.*on cpu"):
        resolve_kernel(T(), "cpu", torch.float32)


def test_kernel_config_errors_name_the_keys():
    with pytest.raises(ConfigError, match="loss.kernel=triton.*loss.fused=false"):
        LossConfig(kernel="triton", fused=False)
    with pytest.raises(ConfigError, match="loss.kernel=triton and loss.compile=true"):
        LossConfig(kernel="triton", compile=True)


def test_every_mode_has_a_kernel_branch():
    assert all(m.kernel_mode is not None for m in MODES.values())
