"""The Triton kernels of ``loss.kernel=triton``: one chunk's per-token divergence and its
closed-form gradient w.r.t. the student logits, read straight from the [c, V] logits.

Why: the torch closed form (``opsd_mm.loss.closed_form``) walks each [c, V] chunk a dozen
times (log-softmaxes, exps, the mode's terms, the clips, the projection through the
log-softmax), in fp32 buffers of their own: the elementwise work, not the two matmuls, set the
fused loss's time on a GPU. Here the logits stay in their own dtype (bf16 from the lm_head) and
every fp32 value lives in registers; the gradient is written over the student logits, in
place, so no [c, V] buffer is allocated at all. The matmuls stay with cuBLAS.

Two kernels, three passes over V for the vocabulary modes:

- :func:`divergence_stats_kernel`, one program per token: pass 1 is an online log-sum-exp over
  V tiles (running max, sum and entropy sum, for student and teacher at the loss temperature,
  and the student at temperature 1 when the loss temperature is not 1); pass 2 (full
  vocabulary only) sums the mode's terms, the clipped terms, the clip count and
  G = sum_v g_v, the gradient's projection through the log-softmax. Both passes accumulate per
  lane of the tile and reduce across lanes once, after the loop (no reduction per tile). A
  top-k support is gathered (k entries, in registers) after pass 1 instead of pass 2; the
  sampled-token mode reads log p(y) and needs no pass 2.
- :func:`divergence_grad_kernel`, one program per (token, V tile), after the caller has applied
  the token clip and the importance weight (``mult`` per token): pass 3 recomputes g_v and writes
  dL/dz_v = mult * (g_v - S_v * G) over the student logits.

Notation as in ``opsd_mm.loss.closed_form``: z the student logits, u the teacher's, tau the
temperature, s = log_softmax(z / tau), S = exp(s), t and T the teacher's; g_v = d(terms)/ds_v
as if the s_v were free (the mode's closed form, ``opsd_mm.loss.modes``). The formulas below
are those of ``modes.py``'s ``terms_and_grad``, term for term; the mode numbers are the
``kernel_mode`` field of its table. Shapes: c tokens of the chunk, V vocabulary, K support.

This module imports Triton at the top: only ``opsd_mm.loss.kernel`` imports it, when the kernel
runs. ``TRITON_INTERPRET=1`` set before that import runs the kernels in Triton's interpreter on
CPU tensors (how the tests check them on a machine without a GPU).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from opsd_mm.loss.modes import (
    KERNEL_FORWARD_KL,
    KERNEL_JSD,
    KERNEL_REVERSE_KL,
    KERNEL_SAMPLED_TOKEN,
)

# Decided when Triton decorated the kernels below (triton.knobs from Triton 3.4 on).
_knobs = getattr(triton, "knobs", None)
INTERPRETED = (
    bool(_knobs.runtime.interpret)
    if _knobs is not None
    else os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
)

_FKL: tl.constexpr = tl.constexpr(KERNEL_FORWARD_KL)
_RKL: tl.constexpr = tl.constexpr(KERNEL_REVERSE_KL)
_JSD: tl.constexpr = tl.constexpr(KERNEL_JSD)
_SAMPLED: tl.constexpr = tl.constexpr(KERNEL_SAMPLED_TOKEN)

# The support: the full vocabulary, the teacher's top k renormalised, or top k + the tail.
SUPPORT_FULL = 0
SUPPORT_RENORM = 1
SUPPORT_TAIL = 2
_FULL: tl.constexpr = tl.constexpr(SUPPORT_FULL)
_RENORM: tl.constexpr = tl.constexpr(SUPPORT_RENORM)
_TAIL: tl.constexpr = tl.constexpr(SUPPORT_TAIL)

# Rows of the per-token outputs. STATS: what DivergenceOut reports (the loss, divergence and
# clip fraction before the token clip, which the caller applies). AUX: what the gradient kernel
# and the caller read back.
STATS_ROWS = 6  # loss, div, clipped, student entropy, teacher entropy, student log p(y) at tau 1
AUX_ROWS = 7
AUX_M_S, AUX_LOGD_S, AUX_M_T, AUX_LOGD_T, AUX_G, AUX_S_Y, AUX_T_Y = range(AUX_ROWS)

# Floor of the tail bucket's mass: ``opsd_mm.loss.divergences._TAIL_FLOOR``, the same clamp.
TAIL_FLOOR = 1e-30
_NEG_START = -1e30  # a running max's start: finite, so that (m_old - m_new) * 0 stays 0


@triton.jit
def _log1p(x):
    """log(1 + x), accurate for small x (Goldberg's correction; core Triton has no log1p)."""
    w = 1.0 + x
    d = w - 1.0
    return tl.where(d == 0.0, x, tl.log(w) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _expm1(x):
    """exp(x) - 1, accurate near 0 (Kahan's correction)."""
    u = tl.exp(x)
    um1 = u - 1.0
    edge = (u == 1.0) | (um1 == -1.0)
    r = um1 * (x / tl.where(edge, 1.0, tl.log(u)))
    r = tl.where(u == 1.0, x, r)
    return tl.where(um1 == -1.0, -1.0, r)


@triton.jit
def _log1mexp(x):
    """log(1 - exp(x)) for x <= -TAIL_FLOOR (the caller clamps), Maechler's two branches."""
    near_zero = x > -0.6931471805599453
    return tl.where(near_zero, tl.log(-_expm1(x)), _log1p(-tl.exp(x)))


@triton.jit
def _logaddexp(a, b):
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return hi + _log1p(tl.exp(lo - hi))


@triton.jit
def _terms_and_grad(s, t, S, T, beta, log_beta, log1m_beta, MODE: tl.constexpr):
    """The mode's terms and g = d(terms)/ds (``opsd_mm.loss.modes``, ``terms_and_grad``)."""
    if MODE == _FKL:  # KL(T || S): terms T (t - s), g = -T
        term = T * (t - s)
        g = -T
    elif MODE == _RKL:  # KL(S || T): terms S (s - t), g = S (s - t + 1)
        term = S * (s - t)
        g = term + S
    else:  # generalized JSD, M = beta T + (1 - beta) S: g = (1 - beta) S (s - m)
        m = _logaddexp(t + log_beta, s + log1m_beta)
        b = s - m
        term = beta * (T * (t - m)) + (1.0 - beta) * (S * b)
        g = (1.0 - beta) * (S * b)
    return term, g


@triton.jit
def _online(x, valid, m, d, e):
    """One V tile into per-lane running (max m, sum d = sum exp(x - m), e = sum exp(x - m)
    (x - m)), [BLOCK_V] each: elementwise, no reduction inside the loop (:func:`_finish`
    reduces the lanes once, after it)."""
    m_new = tl.maximum(m, tl.where(valid, x, float("-inf")))
    scale = tl.exp(m - m_new)
    xs = tl.where(valid, x - m_new, 0.0)
    p = tl.where(valid, tl.exp(xs), 0.0)
    e = scale * (e + (m - m_new) * d) + p * xs
    d = scale * d + p
    return m_new, d, e


@triton.jit
def _finish(m, d, e):
    """The lanes of :func:`_online` combined: (max, log sum, entropy), with lse = max + log sum
    and the entropy log d - e / d, both relative to the max (so a peaked distribution's small
    entropy is not a difference of two large numbers). A lane that saw no entry (m at its
    finite start, d = e = 0) adds nothing."""
    m_all = tl.max(m, 0)
    w = tl.exp(m - m_all)
    d_all = tl.sum(w * d, 0)
    e_all = tl.sum(w * (e + (m - m_all) * d), 0)
    log_d = tl.log(d_all)
    return m_all, log_d, log_d - e_all / d_all


@triton.jit
def _masked_lse(x, valid):
    m = tl.max(tl.where(valid, x, float("-inf")), 0)
    return m + tl.log(tl.sum(tl.where(valid, tl.exp(x - m), 0.0), 0))


@triton.jit
def _scaled(z, tau, TAU_ONE: tl.constexpr):
    # z / tau as the reference divides (not z * (1 / tau)), so both round alike.
    if TAU_ONE:
        return z
    else:
        return z / tau


@triton.jit
def _round_bf16(x):
    """x rounded to the nearest bf16 (ties to even), still as fp32: the store's cast is then
    exact. Triton's interpreter truncates fp32 -> bf16; CUDA's cast rounds; this makes the two
    agree (and NaN stays NaN)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # shifts keep it uint32
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def divergence_stats_kernel(
    z_ptr,  # student logits [c, V], any float dtype, rows contiguous
    u_ptr,  # teacher logits [c, V] (unused when SCORED)
    stride_z,
    stride_u,
    ids_ptr,  # sampled token ids [c] (int64)
    ty_ptr,  # SCORED and sampled-token: the teacher's log p(y) [c] (fp32)
    kid_ptr,  # top-k: the support's ids [c, K] (int64)
    kval_ptr,  # top-k: the teacher's values there: logits, or log-probs when SCORED [c, K]
    stride_kid,
    stride_kval,
    stats_ptr,  # out [STATS_ROWS, c] fp32
    aux_ptr,  # out [AUX_ROWS, c] fp32
    sup_ptr,  # out, top-k: d(loss)/ds at the support less S * G, [c, K] fp32
    n_rows,
    V,
    K,
    tau,
    beta,
    log_beta,
    log1m_beta,
    clip,
    MODE: tl.constexpr,
    SUPPORT: tl.constexpr,
    SCORED: tl.constexpr,
    HAS_IDS: tl.constexpr,
    CLIP: tl.constexpr,
    TAU_ONE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    u_row = u_ptr + row * stride_u
    zero = tl.zeros((), tl.float32)
    nan = zero + float("nan")
    lanes = tl.zeros((BLOCK_V,), tl.float32)

    # Pass 1: online log-sum-exp and entropy of both sides (and of z itself when tau != 1),
    # per lane; the lanes are reduced once, after the loop.
    m_s = lanes + _NEG_START
    d_s = lanes
    e_s = lanes
    m_t = lanes + _NEG_START
    d_t = lanes
    e_t = lanes
    m_1 = lanes + _NEG_START
    d_1 = lanes
    e_1 = lanes
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        valid = offs < V
        z = tl.load(z_row + offs, mask=valid, other=0.0).to(tl.float32)
        m_s, d_s, e_s = _online(_scaled(z, tau, TAU_ONE), valid, m_s, d_s, e_s)
        if not TAU_ONE:
            m_1, d_1, e_1 = _online(z, valid, m_1, d_1, e_1)
        if not SCORED:
            u = tl.load(u_row + offs, mask=valid, other=0.0).to(tl.float32)
            m_t, d_t, e_t = _online(_scaled(u, tau, TAU_ONE), valid, m_t, d_t, e_t)
    m_s, logd_s, ent_s = _finish(m_s, d_s, e_s)
    if SCORED:
        m_t = zero
        logd_t = zero
        ent_t = nan  # the teacher's full distribution never reached the trainer
    else:
        m_t, logd_t, ent_t = _finish(m_t, d_t, e_t)
    if TAU_ONE:
        lse_1 = m_s + logd_s
    else:
        m_1, logd_1, _ = _finish(m_1, d_1, e_1)
        lse_1 = m_1 + logd_1

    # The sampled token: log p(y) at temperature 1 (for DivergenceOut), s_y and t_y at tau.
    logp_y = nan
    s_y = zero
    t_y = zero
    if HAS_IDS:
        y = tl.load(ids_ptr + row)
        z_y = tl.load(z_row + y).to(tl.float32)
        logp_y = z_y - lse_1
        s_y = (_scaled(z_y, tau, TAU_ONE) - m_s) - logd_s
        if SCORED:
            if MODE == _SAMPLED:
                t_y = tl.load(ty_ptr + row).to(tl.float32)
        else:
            u_y = tl.load(u_row + y).to(tl.float32)
            t_y = (_scaled(u_y, tau, TAU_ONE) - m_t) - logd_t

    loss = zero
    div = zero
    count = zero
    g_sum = zero
    if MODE != _SAMPLED:
        if SUPPORT == _FULL:
            # Pass 2: the terms, the point-wise clip and G = sum_v g_v over the vocabulary,
            # summed per lane and reduced once after the loop.
            loss_v = lanes
            div_v = lanes
            count_v = lanes
            g_v = lanes
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                valid = offs < V
                z = tl.load(z_row + offs, mask=valid, other=0.0).to(tl.float32)
                u = tl.load(u_row + offs, mask=valid, other=0.0).to(tl.float32)
                s = (_scaled(z, tau, TAU_ONE) - m_s) - logd_s
                t = (_scaled(u, tau, TAU_ONE) - m_t) - logd_t
                term, g = _terms_and_grad(
                    s, t, tl.exp(s), tl.exp(t), beta, log_beta, log1m_beta, MODE
                )
                term = tl.where(valid, term, 0.0)
                g = tl.where(valid, g, 0.0)
                div_v += term
                if CLIP:
                    over = valid & (term > clip)
                    count_v += over.to(tl.float32)
                    term = tl.where(over, clip, term)
                    g = tl.where(over, 0.0, g)
                loss_v += term
                g_v += g
            loss = tl.sum(loss_v, 0)
            div = tl.sum(div_v, 0)
            count = tl.sum(count_v, 0) / V
            g_sum = tl.sum(g_v, 0)
        else:
            # The teacher's top-k support, gathered into registers.
            koffs = tl.arange(0, BLOCK_K)
            kvalid = koffs < K
            kid = tl.load(kid_ptr + row * stride_kid + koffs, mask=kvalid, other=0)
            z_k = tl.load(z_row + kid, mask=kvalid, other=0.0).to(tl.float32)
            s_k = (_scaled(z_k, tau, TAU_ONE) - m_s) - logd_s  # full-vocabulary log-probs
            tv = tl.load(kval_ptr + row * stride_kval + koffs, mask=kvalid, other=0.0)
            if SCORED:
                t_k = tv.to(tl.float32)
            else:
                t_k = (_scaled(tv.to(tl.float32), tau, TAU_ONE) - m_t) - logd_t
            s_mass = _masked_lse(s_k, kvalid)
            t_mass = _masked_lse(t_k, kvalid)
            if SUPPORT == _RENORM:
                # Renormalised over the k ids: s' = s - log(mass); d/ds = g' - S' sum(g').
                sp = s_k - s_mass
                tp = t_k - t_mass
                Sp = tl.exp(sp)
                term, g = _terms_and_grad(sp, tp, Sp, tl.exp(tp), beta, log_beta, log1m_beta, MODE)
                term = tl.where(kvalid, term, 0.0)
                g = tl.where(kvalid, g, 0.0)
                div = tl.sum(term, 0)
                if CLIP:
                    over = kvalid & (term > clip)
                    count = tl.sum(over.to(tl.float32), 0)
                    term = tl.where(over, clip, term)
                    g = tl.where(over, 0.0, g)
                loss = tl.sum(term, 0)
                ds = tl.where(kvalid, g - Sp * tl.sum(g, 0), 0.0)
                count = count / K
            else:
                # The k ids plus the tail bucket log(1 - mass), whose derivative w.r.t. s_j is
                # -exp(s_j - s_tail) (zero where the floor's clamp binds).
                term, g = _terms_and_grad(
                    s_k, t_k, tl.exp(s_k), tl.exp(t_k), beta, log_beta, log1m_beta, MODE
                )
                term = tl.where(kvalid, term, 0.0)
                g = tl.where(kvalid, g, 0.0)
                s_tail = _log1mexp(tl.minimum(s_mass, -TAIL_FLOOR))
                t_tail = _log1mexp(tl.minimum(t_mass, -TAIL_FLOOR))
                term_tail, g_tail = _terms_and_grad(
                    s_tail, t_tail, tl.exp(s_tail), tl.exp(t_tail), beta, log_beta, log1m_beta, MODE
                )
                div = tl.sum(term, 0) + term_tail
                if CLIP:
                    over = kvalid & (term > clip)
                    over_tail = term_tail > clip
                    count = tl.sum(over.to(tl.float32), 0) + over_tail.to(tl.float32)
                    term = tl.where(over, clip, term)
                    g = tl.where(over, 0.0, g)
                    term_tail = tl.where(over_tail, clip, term_tail)
                    g_tail = tl.where(over_tail, 0.0, g_tail)
                loss = tl.sum(term, 0) + term_tail
                g_tail = tl.where(s_mass > -TAIL_FLOOR, 0.0, g_tail)
                ds = tl.where(kvalid, g - g_tail * tl.exp(s_k - s_tail), 0.0)
                count = count / (K + 1)
            # Zero gradient off the support; through the full log-softmax every entry gets
            # -S_v G (the kernel after this one), the support entries ds as well (the caller
            # scatters ``sup``).
            g_sum = tl.sum(ds, 0)
            tl.store(sup_ptr + row * K + koffs, ds - tl.exp(s_k) * g_sum, mask=kvalid)

    tl.store(stats_ptr + 0 * n_rows + row, loss)
    tl.store(stats_ptr + 1 * n_rows + row, div)
    tl.store(stats_ptr + 2 * n_rows + row, count)
    tl.store(stats_ptr + 3 * n_rows + row, ent_s)
    tl.store(stats_ptr + 4 * n_rows + row, ent_t)
    tl.store(stats_ptr + 5 * n_rows + row, logp_y)
    tl.store(aux_ptr + 0 * n_rows + row, m_s)
    tl.store(aux_ptr + 1 * n_rows + row, logd_s)
    tl.store(aux_ptr + 2 * n_rows + row, m_t)
    tl.store(aux_ptr + 3 * n_rows + row, logd_t)
    tl.store(aux_ptr + 4 * n_rows + row, g_sum)
    tl.store(aux_ptr + 5 * n_rows + row, s_y)
    tl.store(aux_ptr + 6 * n_rows + row, t_y)


@triton.jit
def divergence_grad_kernel(
    z_ptr,  # student logits [c, V]: read, then overwritten by the gradient
    u_ptr,  # teacher logits [c, V] (read by full-vocabulary modes only)
    stride_z,
    stride_u,
    ids_ptr,  # sampled token ids [c]
    aux_ptr,  # [AUX_ROWS, c] from divergence_stats_kernel (G possibly replaced by the caller)
    mult_ptr,  # [c] fp32: importance weight / tau, 0 on token-clipped rows
    n_rows,
    V,
    tau,
    beta,
    log_beta,
    log1m_beta,
    clip,
    MODE: tl.constexpr,
    SUPPORT: tl.constexpr,
    CLIP: tl.constexpr,
    TAU_ONE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = offs < V
    z_row = z_ptr + row * stride_z
    mult = tl.load(mult_ptr + row)
    m_s = tl.load(aux_ptr + 0 * n_rows + row)
    logd_s = tl.load(aux_ptr + 1 * n_rows + row)
    g_sum = tl.load(aux_ptr + 4 * n_rows + row)
    z = tl.load(z_row + offs, mask=valid, other=0.0).to(tl.float32)
    S = tl.exp((_scaled(z, tau, TAU_ONE) - m_s) - logd_s)
    if MODE == _SAMPLED:
        # loss = -A s_y: g = -A at y only, and G = -A (the caller's aux row).
        y = tl.load(ids_ptr + row)
        g = tl.where(offs == y, g_sum, 0.0)
    elif SUPPORT == _FULL:
        m_t = tl.load(aux_ptr + 2 * n_rows + row)
        logd_t = tl.load(aux_ptr + 3 * n_rows + row)
        u = tl.load(u_ptr + row * stride_u + offs, mask=valid, other=0.0).to(tl.float32)
        s = (_scaled(z, tau, TAU_ONE) - m_s) - logd_s
        t = (_scaled(u, tau, TAU_ONE) - m_t) - logd_t
        term, g = _terms_and_grad(s, t, S, tl.exp(t), beta, log_beta, log1m_beta, MODE)
        if CLIP:
            g = tl.where(term > clip, 0.0, g)
    else:
        g = tl.zeros((BLOCK_V,), tl.float32)  # off the support; the caller scatters the rest
    grad = mult * (g - S * g_sum)
    if ROUND_BF16:
        grad = _round_bf16(grad)
    tl.store(z_row + offs, grad.to(z_ptr.dtype.element_ty), mask=valid)
