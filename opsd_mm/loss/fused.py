"""Fused, chunked divergence loss from hidden states and the lm_head weight.

Why: the naive path materialises fp32 logits for student and teacher, [N, V] each, plus the
log-softmaxes and the autograd buffers of the divergence; at N = 8,192 tokens and V = 151,936
that is ~70 GiB. Here tokens are processed in chunks: for each chunk the student and teacher
logits are computed, then the per-token loss and its gradient w.r.t. the chunk's student
logits are taken right away, and that gradient is pushed through the lm_head into the
hidden-state gradient (and the weight/bias gradients when those train). Only one chunk's logits
ever exist. The gradients are stored during forward; backward only scales them by
``grad_output``.

Per chunk, the loss and its logit gradient come in closed form on the full vocabulary
(``opsd_mm.loss.closed_form``: half the working set and fewer passes over [chunk, V] than
autograd), and by autograd through :func:`opsd_mm.loss.divergences.token_divergence` under top-k,
whose gather/renormalisation has no short closed form, and for a mode whose entry in the table
``opsd_mm.loss.modes`` has no ``terms_and_grad``. Which one runs follows
:func:`~opsd_mm.loss.closed_form.has_closed_form` and the mode's fields (``mode_for``), never its
name. ``token_divergence`` stays the one reference: both are tested against it, values and
gradients. ``loss.kernel`` (``opsd_mm.loss.kernel``) may hand every chunk to our Triton kernel
instead (any support, any mode with a ``kernel_mode``): the logits in their own dtype, the
gradient written over the student logits, no fp32 [chunk, V] buffer at all.

A trainable lm_head's gradient is accumulated over the chunks in ONE [V, H] buffer of the
weight's own dtype, which backward scales in place and hands to autograd: no second full-size
buffer (an fp32 accumulator plus its cast was 2.3x Liger's memory on an H200). With fp32
weights, as under the trainer's autocast, nothing changes; with bf16 weights each chunk's
product is added in fp32 inside the GEMM and rounded once per chunk, as Liger does.

Consequences worth knowing: the forward pass does the backward work too (skipped when no input
needs a gradient, e.g. under ``torch.no_grad``); the graph cannot be differentiated twice.
Shape suffixes: the legend of ``opsd_mm.types`` (``c``: the tokens of one chunk).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from opsd_mm.config import LossConfig
from opsd_mm.loss.closed_form import (
    consume_divergence_and_grad,
    divergence_and_grad,
    has_closed_form,
    no_closed_form_reason,
)
from opsd_mm.loss.divergences import (
    DivergenceOut,
    check_scored_teacher,
    token_divergence,
)
from opsd_mm.loss.importance import importance_weights
from opsd_mm.loss.kernel import log_choice, resolve_kernel, triton_chunk
from opsd_mm.loss.modes import mode_for
from opsd_mm.types import TeacherLogprobs

# Default chunk: ~256 MiB of fp32 logits per chunk, student and teacher together. The whole
# working set of one chunk is larger, counted in fp32 [chunk, V] tensors by bench/live_bytes.py
# (the CPU analog of CUDA's max_memory_allocated): 6 for the JSD and 4 for the other modes with
# the closed-form gradients; 13-14 for the JSD by autograd through token_divergence (top-k's
# path). At V = 151,936 a 208-token chunk is 121 MiB. Larger chunks stream the [V, H] weight
# from memory fewer times (2 passes per chunk): on CPU, 48-token chunks cost ~25% more CPU time
# than the naive path, 208-token chunks were within 10% of it (bench/divergence.py).
CHUNK_LOGITS_BUDGET_BYTES = 256 * 2**20
_LOGITS_PER_CHUNK = 2  # student + teacher

ChunkFn = Callable[..., tuple[torch.Tensor, ...]]


def default_chunk_size(vocab_size: int, budget_bytes: int = CHUNK_LOGITS_BUDGET_BYTES) -> int:
    """Tokens per chunk so that the chunk's fp32 student + teacher logits take ~``budget_bytes``
    (V = 151,936 -> 208 tokens), rounded down to a multiple of 16 (GPU matmul tiles) when
    above 16."""
    chunk = max(1, budget_bytes // (vocab_size * 4 * _LOGITS_PER_CHUNK))
    return chunk - chunk % 16 if chunk > 16 else chunk


# The per-token rows of the fused path's stats tensor [S, N], in DivergenceOut's field order.
_STATS = (
    "loss_N",
    "div_N",
    "clipped_N",
    "student_entropy_N",
    "teacher_entropy_N",
    "student_logprob_N",
)


def _stats(out: DivergenceOut) -> tuple[torch.Tensor, ...]:
    """A DivergenceOut's per-token tensors in ``_STATS`` order."""
    return tuple(getattr(out, name) for name in _STATS)


def _chunk_divergence(
    student_logits_cV: torch.Tensor,
    teacher_logits_cV: torch.Tensor,
    sampled_ids_c: torch.Tensor,
    cfg: LossConfig,
) -> tuple[torch.Tensor, ...]:
    """token_divergence on one chunk, as a plain tuple (what torch.compile handles best)."""
    return _stats(token_divergence(student_logits_cV, teacher_logits_cV, sampled_ids_c, cfg))


def _chunk_divergence_and_grad(
    logits: list[torch.Tensor | None], sampled_ids_c: torch.Tensor, cfg: LossConfig
) -> tuple[torch.Tensor, ...]:
    """The closed form on one chunk, ``logits = [student_cV, teacher_cV]`` (emptied, so that
    they are freed as soon as they are used): the stats of ``_chunk_divergence``, then the
    gradient of the chunk's summed loss w.r.t. its student logits."""
    out, grad_cV = consume_divergence_and_grad(logits, sampled_ids_c, cfg)
    return (*_stats(out), grad_cV)


def _compiled_closed_form(compiled: ChunkFn) -> ChunkFn:
    # Under torch.compile the generated kernels manage their own buffers: pass the tensors.
    def fn(logits, sampled_ids_c, cfg):
        out, grad_cV = compiled(*logits, sampled_ids_c, cfg)
        logits.clear()
        return (*_stats(out), grad_cV)

    return fn


def _autograd_chunk_divergence_and_grad(chunk_fn: ChunkFn) -> ChunkFn:
    """The same contract by autograd through ``chunk_fn`` (a possibly compiled
    ``_chunk_divergence``): for top-k, and as the reference the closed form is tested against."""

    def fn(logits, sampled_ids_c, cfg):
        s_logits_cV = logits[0].detach().requires_grad_(True)
        t_logits_cV = logits[1]
        logits.clear()
        with torch.enable_grad():
            outs = chunk_fn(s_logits_cV, t_logits_cV, sampled_ids_c, cfg)
            (grad_cV,) = torch.autograd.grad(outs[0].sum(), s_logits_cV)
        return (*(o.detach() for o in outs), grad_cV)

    return fn


# Built on first use (no import-time side effect); dynamic shapes cover the last, shorter chunk
# without a recompile.
@functools.cache
def _compiled_chunk_divergence() -> ChunkFn:
    return torch.compile(_chunk_divergence, dynamic=True)


@functools.cache
def _compiled_chunk_divergence_and_grad() -> ChunkFn:
    return _compiled_closed_form(torch.compile(divergence_and_grad, dynamic=True))


def _row_weight(
    student_logprob_c: torch.Tensor,
    rollout_logprob_c: torch.Tensor | None,
    clip: float | None,
    fixed_c: torch.Tensor | None,
) -> torch.Tensor:
    """The weights of one chunk's tokens: importance weights from their just-computed student
    log-probs (when ``rollout_logprob_c`` is given), times the fixed per-token weights
    ``fixed_c`` (``loss.view_weighting``)."""
    w_c = None
    if rollout_logprob_c is not None:
        w_c = importance_weights(student_logprob_c, rollout_logprob_N=rollout_logprob_c, clip=clip)
    if fixed_c is not None:
        fixed_c = fixed_c.float()
        w_c = fixed_c if w_c is None else w_c * fixed_c
    return w_c


def _weighted(chunk_grad_fn: ChunkFn) -> ChunkFn:
    """A torch chunk-gradient function with the importance weights applied to its gradient:
    d(sum_n w_n loss_n)/d logits_n = w_n dloss_n/dlogits_n (w detached). The Triton chunk
    folds the weights into its own gradient pass instead."""

    def fn(logits, sampled_ids_c, cfg, row_weight=None):
        *outs, grad_cV = chunk_grad_fn(logits, sampled_ids_c, cfg)
        if row_weight is not None:
            w_c = row_weight(outs[_STATS.index("student_logprob_N")])
            grad_cV = grad_cV * w_c.to(grad_cV.dtype)[:, None]
        return (*outs, grad_cV)

    return fn


def _triton_chunk_stats(student_logits_cV, teacher_logits_cV, sampled_ids_c, cfg):
    return triton_chunk([student_logits_cV, teacher_logits_cV], sampled_ids_c, cfg, need_grad=False)


def _triton_chunk_grad(logits, sampled_ids_c, cfg, row_weight=None):
    return triton_chunk(logits, sampled_ids_c, cfg, row_weight=row_weight)


class _FusedDivergence(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student_hidden_NH: torch.Tensor,
        weight_VH: torch.Tensor,
        bias_V: torch.Tensor | None,
        teacher_hidden_NH: torch.Tensor,
        teacher_weight_VH: torch.Tensor,
        teacher_bias_V: torch.Tensor | None,
        sampled_ids_N: torch.Tensor,
        cfg: LossConfig,
        scale: float,
        chunk_size: int,
        needs_grad: tuple[bool, bool, bool],
        shared_head: bool,
        chunk_fn: ChunkFn,
        chunk_grad_fn: ChunkFn,
        rollout_logprob_N: torch.Tensor | None,
        teacher_logprobs: TeacherLogprobs | None,
        token_weight_N: torch.Tensor | None,
    ):
        n_tokens = student_hidden_NH.shape[0]
        device = student_hidden_NH.device
        need_h, need_w, need_b = needs_grad
        stats_dtype = torch.promote_types(student_hidden_NH.dtype, torch.float32)
        stats_SN = torch.zeros(len(_STATS), n_tokens, dtype=stats_dtype, device=device)
        grad_h_NH = torch.zeros_like(student_hidden_NH) if need_h else None
        # The weight's gradient accumulates in the weight's own dtype: the one [V, H] buffer,
        # handed to autograd as is (see the module docstring). The bias's, [V], in fp32.
        grad_w_VH = torch.zeros_like(weight_VH) if need_w else None
        grad_b_V = None
        if need_b and bias_V is not None:
            grad_b_V = torch.zeros_like(bias_V, dtype=torch.float32)
        any_grad = need_h or need_w or grad_b_V is not None
        # Importance weights (opsd_mm.loss.importance), known per chunk once its student log-probs are.
        # Fixed per-token weights (loss.view_weighting) multiply them.
        if rollout_logprob_N is None or cfg.importance_clip is None:
            rollout_logprob_N = None
        weight_N = None
        if rollout_logprob_N is not None or token_weight_N is not None:
            weight_N = torch.ones(n_tokens, dtype=torch.float32, device=device)

        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            h_cH = student_hidden_NH[start:end].to(weight_VH.dtype)
            if teacher_logprobs is not None:  # scored elsewhere: no teacher logits to compute
                logits = [F.linear(h_cH, weight_VH, bias_V), teacher_logprobs[start:end]]
            elif shared_head:
                ht_cH = teacher_hidden_NH[start:end].to(teacher_weight_VH.dtype)
                # One matmul for both sides streams the [V, H] weight from memory once, not twice.
                both_2cV = F.linear(torch.cat([h_cH, ht_cH]), weight_VH, bias_V)
                logits = [both_2cV[: end - start], both_2cV[end - start :]]
                del both_2cV
            else:
                ht_cH = teacher_hidden_NH[start:end].to(teacher_weight_VH.dtype)
                logits = [
                    F.linear(h_cH, weight_VH, bias_V),
                    F.linear(ht_cH, teacher_weight_VH, teacher_bias_V),
                ]
            ids_c = sampled_ids_N[start:end]
            # Importance weights (opsd_mm.loss.importance), from the chunk's own student
            # log-probs: known only once the chunk function has them; times the fixed weights.
            row_weight = None
            if weight_N is not None:
                row_weight = functools.partial(
                    _row_weight,
                    rollout_logprob_c=None
                    if rollout_logprob_N is None
                    else rollout_logprob_N[start:end],
                    clip=cfg.importance_clip,
                    fixed_c=None if token_weight_N is None else token_weight_N[start:end],
                )
            if not any_grad:
                outs = chunk_fn(*logits, ids_c, cfg)
                del logits
            else:
                # The list is the only reference to the logits: the chunk function frees them.
                *outs, g_logits_cV = chunk_grad_fn(logits, ids_c, cfg, row_weight)
            stats_SN[:, start:end] = torch.stack([o.detach().to(stats_dtype) for o in outs])
            if row_weight is not None:
                weight_N[start:end] = row_weight(outs[_STATS.index("student_logprob_N")])
            del outs
            if not any_grad:
                continue
            g_cV = g_logits_cV.to(weight_VH.dtype)
            del g_logits_cV  # the fp32 gradient, when the weight is bf16
            if grad_h_NH is not None:
                grad_h_NH[start:end] = g_cV @ weight_VH
            if grad_w_VH is not None:
                # In place, in the weight's dtype: no [V, H] temporary per chunk.
                grad_w_VH.addmm_(g_cV.t(), h_cH.to(grad_w_VH.dtype))
            if grad_b_V is not None:
                grad_b_V += g_cV.float().sum(0)
            del g_cV  # before the next chunk's logits: one chunk's working set at a time

        ctx.scale = scale
        ctx.param_dtypes = (weight_VH.dtype, bias_V.dtype if bias_V is not None else None)
        ctx.save_for_backward(grad_h_NH, grad_b_V)
        # Not saved for backward: a saved tensor is still referenced when autograd accumulates
        # the returned gradient, which then copies it (a second [V, H] buffer). Backward takes
        # it from here and drops the reference.
        ctx.grad_w_VH = grad_w_VH
        ctx.has_grad_w = grad_w_VH is not None
        loss_N = stats_SN[0] if weight_N is None else stats_SN[0] * weight_N.to(stats_dtype)
        loss = loss_N.sum() * scale
        ctx.mark_non_differentiable(stats_SN)
        return loss, stats_SN

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_stats: torch.Tensor):
        grad_h_NH, grad_b_V = ctx.saved_tensors
        mult = grad_loss * ctx.scale
        _, b_dtype = ctx.param_dtypes
        gh = gw = gb = None
        if grad_h_NH is not None:
            # Scaled in fp32: a bf16 copy of 1/num_tokens would be off by up to 0.4%.
            gh = (grad_h_NH.to(mult.dtype) * mult).to(grad_h_NH.dtype)
        if ctx.has_grad_w:
            gw, ctx.grad_w_VH = ctx.grad_w_VH, None
            if gw is None:
                raise RuntimeError(
                    "fused_divergence: backward ran twice through one loss (its weight gradient "
                    "was handed over the first time); compute the loss again"
                )
            _scale_in_place(gw, mult)
        if grad_b_V is not None:
            gb = (grad_b_V * mult).to(b_dtype)
        return gh, gw, gb, *([None] * 14)


def _scale_in_place(x: torch.Tensor, mult: torch.Tensor, block_bytes: int = 64 * 2**20) -> None:
    """x *= mult with the product in fp32 (at least), rounded once into x's dtype: a bf16 x
    is scaled in row blocks of at most ``block_bytes`` and 1/16 of x in fp32, never a
    full-size copy (a bf16 copy of 1/num_tokens itself would be off by up to 0.4%)."""
    if x.dtype in (torch.float32, torch.float64):
        x.mul_(mult.to(x.dtype))
        return
    if x.dim() < 2:
        x.copy_(x.float() * mult)
        return
    row_bytes = x[0].numel() * 4
    rows = max(1, min(block_bytes, x.numel() * 4 // 16) // row_bytes)
    for block in x.split(rows):
        block.copy_(block.float() * mult)


def fused_divergence(
    student_hidden_NH: torch.Tensor,
    teacher_hidden_NH: torch.Tensor | None,
    weight_VH: torch.Tensor,
    sampled_ids_N: torch.Tensor | None,
    cfg: LossConfig,
    *,
    bias_V: torch.Tensor | None = None,
    teacher_weight_VH: torch.Tensor | None = None,
    teacher_bias_V: torch.Tensor | None = None,
    scale: float = 1.0,
    chunk_size: int | None = None,
    compile: bool = False,
    closed_form: bool | None = None,
    rollout_logprob_N: torch.Tensor | None = None,
    teacher_logprobs: TeacherLogprobs | None = None,
    token_weight_N: torch.Tensor | None = None,
) -> tuple[torch.Tensor, DivergenceOut]:
    """``scale * sum_n loss_n`` over N loss tokens, without materialising [N, V] logits.

    Args:
        student_hidden_NH: final hidden states (after the model's last norm) at the positions
            that predict the N loss tokens; gradients flow back into them.
        teacher_hidden_NH: the teacher's hidden states at the same N positions (detached here).
        weight_VH, bias_V: the student's lm_head; they get gradients only if they require grad
            (frozen under LoRA, trainable under full fine-tuning or tied embeddings).
        sampled_ids_N: the completion tokens (used by ``sampled_pg``; may be None otherwise).
        cfg: the loss settings, with exactly the semantics of ``token_divergence``.
        teacher_weight_VH, teacher_bias_V: the teacher's lm_head, when it differs (a fixed or
            EMA teacher under full fine-tuning). When ``teacher_weight_VH`` is None the teacher uses
            ``weight_VH`` and ``bias_V`` (same model); otherwise ``teacher_bias_V`` as given.
        scale: multiplies the summed loss; pass ``1 / num_tokens_global`` to get what
            ``reduce_loss`` gives on the naive path.
        chunk_size: tokens per chunk; None -> :func:`default_chunk_size` (~256 MiB of logits).
        compile: run each chunk's divergence through ``torch.compile`` (off by default).
            ``cfg.kernel`` (``opsd_mm.loss.kernel.resolve_kernel``) decides whether the chunks
            go to the Triton kernel instead (``auto``: on CUDA, without ``compile``).
        closed_form: the chunk's logit gradient in closed form (``opsd_mm.loss.closed_form``);
            None (default) uses it wherever it applies (the full vocabulary, and a mode with a
            closed form: ``has_closed_form``), False forces autograd through
            ``token_divergence`` (the reference, never the kernel), True raises where it does
            not apply.
        rollout_logprob_N: the rollout engine's log p of each sampled token (NaN: unknown).
            With ``cfg.importance_clip`` set, token n's loss (and gradient) is multiplied by
            ``opsd_mm.loss.importance.importance_weights`` of the chunk's own student log-prob, so
            the returned loss is ``scale * sum_n w_n loss_n``; ``stats.loss_N`` stays unweighted.
        teacher_logprobs: the teacher scored elsewhere (``teacher.scoring=server``), in place of
            ``teacher_hidden_NH`` (then None) and the teacher head: its sampled-token or top-k
            log-probabilities, as :func:`~opsd_mm.loss.divergences.token_divergence` takes them.
            ``sampled_pg`` (sampled-token-only) keeps its closed-form chunk gradient (it reads
            log p_t(y) alone); a top-k support takes each chunk's gradient by autograd, as it
            does locally.
        token_weight_N: fixed (detached) per-token weights, multiplying each token's loss and
            gradient like the importance weights (and with them): ``loss.view_weighting``'s
            coefficients (``opsd_mm.loss.view_gain``). ``stats.loss_N`` stays unweighted.

    Returns:
        (loss, stats): ``loss`` a 0-d fp32 tensor with autograd; ``stats`` a DivergenceOut of
        detached [N] fp32 tensors (its ``loss_N`` is detached too).

    Math is fp32 whatever the input dtype; logits are computed in the weight's dtype, as an
    ``nn.Linear`` lm_head would, then upcast.
    """
    if (teacher_hidden_NH is None) == (teacher_logprobs is None):
        raise ValueError("fused_divergence needs teacher_hidden_NH or teacher_logprobs, not both")
    mode = mode_for(cfg.divergence, cfg.beta)
    autograd_asked = closed_form is False
    if teacher_logprobs is not None:
        # An empty [N, 0] stand-in, so the shape checks below cover the scored tokens too.
        teacher_hidden_NH = student_hidden_NH.new_empty(teacher_logprobs.token_N.shape[0], 0)
        teacher_weight_VH, teacher_bias_V = None, None
        check_scored_teacher(teacher_logprobs, cfg, student_hidden_NH.shape[0])
        # A sampled-token-only mode's closed form reads log p_t(y) only; a top-k support goes
        # through autograd.
        if closed_form and not mode.sampled_token_only:
            raise ValueError("closed_form=True: no closed-form top-k gradient (scored teacher)")
        if closed_form is None:
            closed_form = mode.sampled_token_only
    if student_hidden_NH.dim() != 2 or teacher_hidden_NH.dim() != 2:
        raise ValueError(
            "fused_divergence expects hidden states of shape [N, H] (select the loss positions "
            f"first); got {tuple(student_hidden_NH.shape)} and {tuple(teacher_hidden_NH.shape)}"
        )
    n_tokens = student_hidden_NH.shape[0]
    if teacher_hidden_NH.shape[0] != n_tokens:
        raise ValueError(
            f"student and teacher hidden states must cover the same N tokens; got {n_tokens} "
            f"and {teacher_hidden_NH.shape[0]}"
        )
    shared_head = teacher_weight_VH is None or (
        teacher_weight_VH is weight_VH and teacher_bias_V is bias_V
    )
    if teacher_weight_VH is None:
        teacher_weight_VH, teacher_bias_V = weight_VH, bias_V
    if teacher_weight_VH.shape[0] != weight_VH.shape[0]:
        raise ValueError(
            f"student and teacher vocabularies differ: {weight_VH.shape[0]} vs "
            f"{teacher_weight_VH.shape[0]}"
        )
    if sampled_ids_N is None:
        if mode.sampled_token_only:
            raise ValueError("loss.divergence=sampled_pg needs the sampled token ids")
        sampled_ids_N = torch.zeros(n_tokens, dtype=torch.long, device=student_hidden_NH.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(weight_VH.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    grad_on = torch.is_grad_enabled()
    needs_grad = (
        grad_on and student_hidden_NH.requires_grad,
        grad_on and weight_VH.requires_grad,
        grad_on and bias_V is not None and bias_V.requires_grad,
    )
    if closed_form is None:
        closed_form = has_closed_form(cfg, weight_VH.shape[0])
    elif closed_form and not has_closed_form(cfg, weight_VH.shape[0]):
        raise ValueError(
            "closed_form=True: no closed-form gradient for "
            f"{no_closed_form_reason(cfg, weight_VH.shape[0])}; pass closed_form=None"
        )
    kernel = "torch"
    if not autograd_asked:  # closed_form=False asks for the autograd reference
        device = student_hidden_NH.device
        logits_dtype = weight_VH.dtype
        if torch.is_autocast_enabled(device.type):
            logits_dtype = torch.get_autocast_dtype(device.type)
        kernel, why = resolve_kernel(cfg, device, logits_dtype, compile)
        log_choice(kernel, why)
    if kernel == "triton":
        chunk_fn, chunk_grad_fn = _triton_chunk_stats, _triton_chunk_grad
    else:
        chunk_fn = _compiled_chunk_divergence() if compile else _chunk_divergence
        if closed_form:
            chunk_grad_fn = (
                _compiled_chunk_divergence_and_grad() if compile else _chunk_divergence_and_grad
            )
        else:
            chunk_grad_fn = _autograd_chunk_divergence_and_grad(chunk_fn)
        chunk_grad_fn = _weighted(chunk_grad_fn)
    loss, stats_SN = _FusedDivergence.apply(
        student_hidden_NH,
        weight_VH,
        bias_V,
        teacher_hidden_NH.detach(),
        teacher_weight_VH.detach(),
        teacher_bias_V.detach() if teacher_bias_V is not None else None,
        sampled_ids_N,
        cfg,
        float(scale),
        int(chunk_size),
        needs_grad,
        shared_head,
        chunk_fn,
        chunk_grad_fn,
        rollout_logprob_N,
        teacher_logprobs,
        None if token_weight_N is None else token_weight_N.detach(),
    )
    return loss, DivergenceOut(**dict(zip(_STATS, stats_SN.unbind(0))))
