"""``loss.kernel``: which code computes the fused path's per-chunk divergence and logit gradient,
and the Triton side of it (the torch side is ``opsd_mm.loss.closed_form``).

Why a choice: on a GPU the torch closed form is bound by its elementwise passes over each
[chunk, V] block (fp32 buffers of their own; 1.4-1.9x slower than Liger's Triton kernel on an
H200), while the kernels of ``opsd_mm.loss.triton_divergence`` read the logits once per pass in
their own dtype and write the gradient over the student logits. ``auto`` takes Triton where it
compiles (CUDA tensors, Triton importable, no ``loss.compile``) and the torch closed form
elsewhere; ``triton`` insists (a :class:`~opsd_mm.errors.UserError` says why it cannot run);
``torch`` never uses it.

:func:`triton_chunk` has the contract of the fused path's chunk functions
(``opsd_mm.loss.fused``): ``logits = [student_cV, teacher_cV]`` (emptied), the chunk's sampled
ids and the loss settings in; the six per-token statistics of ``DivergenceOut`` and the
gradient of the chunk's summed loss w.r.t. the student logits out - here in the student logits'
own memory and dtype. The token clip and the sampled-token advantage are the shared torch
functions (``apply_token_clip``, ``sampled_pg_loss``) applied to the kernel's per-token sums;
the point-wise clip is in the kernel (it acts on each vocabulary term).

On CPU tensors the kernels run only in Triton's interpreter (``TRITON_INTERPRET=1`` in the
environment before the first kernel call): slow, for the parity tests, never chosen by ``auto``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
from collections.abc import Callable

import torch

from opsd_mm.config import LossConfig
from opsd_mm.errors import UserError
from opsd_mm.loss.divergences import apply_token_clip, loss_temperature, sampled_pg_loss
from opsd_mm.loss.modes import mode_for
from opsd_mm.types import TeacherLogprobs

log = logging.getLogger(__name__)

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The top-k support is held in registers, one program per token: up to this many entries.
MAX_TOP_K = 4096
# V tile of the two kernels on a GPU (a power of two; the interpreter tests pass smaller ones):
# the stats kernel keeps 6-9 per-lane accumulators of its tile in registers (8 per thread at 8
# warps); untuned until a GPU run.
BLOCK_V_STATS = 2048
BLOCK_V_GRAD = 2048


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter: ``TRITON_INTERPRET`` set now (the
    interpreter reads it when a kernel runs) and when the kernel module was first imported
    (Triton reads it when it decorates the kernels)."""
    import sys

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0", "false", "False"):
        return False
    module = sys.modules.get("opsd_mm.loss.triton_divergence")
    return module is None or module.INTERPRETED


def triton_unavailable(
    cfg: LossConfig, device: torch.device | str, dtype: torch.dtype
) -> str | None:
    """Why the Triton kernel cannot run these settings on ``device`` with logits of ``dtype``;
    None when it can."""
    if not triton_importable():
        return "Triton is not importable (pip install triton; it comes with torch's CUDA wheels)"
    if mode_for(cfg.divergence, cfg.beta).kernel_mode is None:
        return f"loss.divergence={cfg.divergence} has no kernel branch (its kernel_mode is None)"
    if dtype not in KERNEL_DTYPES:
        return f"the kernel computes from fp32/bf16/fp16 logits, not {dtype}"
    if cfg.top_k > MAX_TOP_K:
        return f"loss.top_k={cfg.top_k} is above the kernel's {MAX_TOP_K} support entries"
    if torch.device(device).type != "cuda" and not _interpreting():
        return (
            f"the tensors are on {torch.device(device).type}: Triton compiles for CUDA (on a CPU "
            "it runs only in its slow interpreter, TRITON_INTERPRET=1, for tests)"
        )
    return None


def resolve_kernel(
    cfg: LossConfig, device: torch.device | str, dtype: torch.dtype, compile: bool = False
) -> tuple[str, str]:
    """("triton" or "torch", why) for ``cfg.kernel`` on this device and logits dtype.

    ``auto`` picks Triton on CUDA only (never the interpreter) and never under ``compile``
    (``loss.compile`` asks for torch.compile'd chunks). ``triton`` raises a UserError naming
    ``loss.kernel`` when the kernel cannot run here."""
    choice = getattr(cfg, "kernel", "auto")
    if choice == "torch":
        return "torch", "loss.kernel=torch"
    why_not = triton_unavailable(cfg, device, dtype)
    if choice == "triton":
        if why_not:
            raise UserError(f"loss.kernel=triton cannot run: {why_not}; set loss.kernel=auto")
        return "triton", "loss.kernel=triton"
    if compile:
        return "torch", "loss.kernel=auto with loss.compile=true: torch.compile'd chunks"
    if why_not:
        return "torch", f"loss.kernel=auto: torch closed form ({why_not})"
    if torch.device(device).type != "cuda":
        return "torch", "loss.kernel=auto: torch closed form (the interpreter is for tests)"
    return "triton", "loss.kernel=auto: the Triton kernel (CUDA)"


@functools.cache
def log_choice(choice: str, why: str) -> None:
    """Log the fused path's chunk kernel once per (choice, reason) in a process."""
    log.info("fused loss chunks: %s (%s)", choice, why)


def _kernels():
    from opsd_mm.loss import triton_divergence

    return triton_divergence


def _support(cfg: LossConfig, vocab_size: int) -> int:
    k = _kernels()
    if cfg.top_k <= 0 or cfg.top_k >= vocab_size:  # k >= V is the full vocabulary, as naive
        return k.SUPPORT_FULL
    return k.SUPPORT_TAIL if cfg.top_k_tail_bucket else k.SUPPORT_RENORM


def triton_chunk(
    logits: list[torch.Tensor | TeacherLogprobs | None],
    sampled_ids_c: torch.Tensor | None,
    cfg: LossConfig,
    *,
    need_grad: bool = True,
    row_weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
    block_v: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, ...]:
    """One chunk through the Triton kernels: the stats of ``DivergenceOut`` (loss_N, div_N,
    clipped_N, student and teacher entropies, student log p(y) at temperature 1; fp32 [c]
    each) and, with ``need_grad``, d(sum_n w_n loss_n)/d(student logits) in the student
    logits' memory and dtype (which it overwrites).

    ``logits = [student_cV, teacher]`` is emptied; the teacher is its logits [c, V] or a
    :class:`TeacherLogprobs` (scored on the server: sampled-token or top-k log-probs).
    ``row_weight(student_logprob_c) -> w_c``: the importance weights, known once the kernel
    has the tokens' log-probs, folded into the gradient (``loss_N`` stays unweighted).
    ``block_v``: the V tiles of the two kernels (tests use small ones to cross tile edges).
    """
    k = _kernels()
    z_cV, teacher = logits
    logits.clear()
    n_rows, vocab = z_cV.shape
    device = z_cV.device
    mode = mode_for(cfg.divergence, cfg.beta)
    scored = isinstance(teacher, TeacherLogprobs)
    support = _support(cfg, vocab)
    tau = loss_temperature(cfg)
    f32 = dict(dtype=torch.float32, device=device)
    stats_SN = torch.empty(k.STATS_ROWS, n_rows, **f32)
    aux_AN = torch.empty(k.AUX_ROWS, n_rows, **f32)
    if z_cV.stride(-1) != 1:
        z_cV = z_cV.contiguous()
    u_cV = z_cV if scored else teacher
    if not scored and u_cV.stride(-1) != 1:
        u_cV = u_cV.contiguous()
    has_ids = sampled_ids_c is not None
    ids_c = sampled_ids_c.long().contiguous() if has_ids else stats_SN
    ty_c = stats_SN
    if scored and mode.sampled_token_only:
        ty_c = teacher.token_N.to(device=device, dtype=torch.float32).contiguous()
    kid_cK = kval_cK = sup_cK = stats_SN
    n_support = 0
    if support != k.SUPPORT_FULL:
        n_support = cfg.top_k
        if scored:
            kid_cK = teacher.topk_ids_NK.to(device).long().contiguous()
            kval_cK = teacher.topk_NK.to(device=device, dtype=torch.float32).contiguous()
        else:
            # The order of the teacher's logits is that of its log-probs (the same shift per
            # row): the reference's top-k ids, up to ties.
            kval_cK, kid_cK = torch.topk(u_cV, n_support, dim=-1)
            kval_cK, kid_cK = kval_cK.contiguous(), kid_cK.contiguous()
        sup_cK = torch.empty(n_rows, n_support, **f32)
    clip = cfg.pointwise_clip
    beta = float(cfg.beta)
    consts = dict(
        tau=float(tau),
        beta=beta,
        log_beta=math.log(beta) if beta > 0 else 0.0,
        log1m_beta=math.log1p(-beta) if beta < 1 else 0.0,
        clip=float(clip) if clip is not None else 0.0,
    )
    block_stats, block_grad = block_v or (BLOCK_V_STATS, BLOCK_V_GRAD)
    block_stats = min(block_stats, _next_pow2(vocab))
    block_grad = min(block_grad, _next_pow2(vocab))
    if n_rows > 0:
        k.divergence_stats_kernel[(n_rows,)](
            z_cV,
            u_cV,
            z_cV.stride(0),
            u_cV.stride(0),
            ids_c,
            ty_c,
            kid_cK,
            kval_cK,
            kid_cK.stride(0),
            kval_cK.stride(0),
            stats_SN,
            aux_AN,
            sup_cK,
            n_rows,
            vocab,
            n_support,
            **consts,
            MODE=mode.kernel_mode,
            SUPPORT=support,
            SCORED=scored,
            HAS_IDS=has_ids,
            CLIP=clip is not None,
            TAU_ONE=tau == 1.0,
            BLOCK_V=block_stats,
            BLOCK_K=max(16, _next_pow2(n_support)),  # >= 16 lanes: no 1-wide layouts
            num_warps=8,
        )
    loss_N, div_N, clipped_N, ent_s_N, ent_t_N, logp_N = stats_SN.unbind(0)
    over_N = None
    if mode.sampled_token_only:
        s_y_N, t_y_N = aux_AN[k.AUX_S_Y], aux_AN[k.AUX_T_Y]
        loss_N, div_N, clipped_N, advantage_N = sampled_pg_loss(s_y_N, t_y_N, cfg)
        aux_AN[k.AUX_G] = -advantage_N  # loss = -A s_y: g = -A at y, so G = -A
    else:
        loss_N, clipped_N, over_N = apply_token_clip(loss_N, clipped_N, cfg)
    stats = (loss_N, div_N, clipped_N, ent_s_N, ent_t_N, logp_N)
    if not need_grad:
        return stats
    # Per token: the importance weight, 1/tau, zero where the token clip binds.
    mult_N = torch.full((n_rows,), 1.0 / tau, **f32)
    if row_weight is not None:
        mult_N = mult_N * row_weight(logp_N).to(mult_N)
    if over_N is not None:
        mult_N = mult_N.masked_fill(over_N, 0.0)
    if n_rows > 0:
        grid = (n_rows, triton_cdiv(vocab, block_grad))
        k.divergence_grad_kernel[grid](
            z_cV,
            u_cV,
            z_cV.stride(0),
            u_cV.stride(0),
            ids_c,
            aux_AN,
            mult_N,
            n_rows,
            vocab,
            **consts,
            MODE=mode.kernel_mode,
            SUPPORT=support,
            CLIP=clip is not None,
            TAU_ONE=tau == 1.0,
            ROUND_BF16=z_cV.dtype == torch.bfloat16,
            BLOCK_V=block_grad,
            num_warps=4,
        )
        if support != k.SUPPORT_FULL:
            # The support entries: (ds - S G) * mult, rounded once into the logits' dtype.
            z_cV.scatter_(1, kid_cK, (sup_cK * mult_N[:, None]).to(z_cV.dtype))
    return (*stats, z_cV)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
