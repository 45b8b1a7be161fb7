"""The reward's policy-gradient term on the sampled tokens: ``-A * log p_s(y)`` per token.

``A`` is the completion's group-normalised advantage (``opsd_mm.loss.rewards.group_advantages``),
constant over its tokens and detached; ``log p_s(y)`` is the student's log-probability of the
sampled token at the loss temperature (the sampling temperature unless set: the policy that
sampled y, as TRL's GRPOTrainer divides the logits by its sampling temperature). This is GRPO's
loss on fresh on-policy samples (one optimizer step per rollout batch: the importance ratio is 1,
so PPO clipping never binds and is left out). Per-token values are reduced like the
distillation term: summed and multiplied by the trainer's ``scale`` (1 / the step's loss tokens),
TRL's ``loss_type="dapo"`` normalisation.

Two ways to get ``log p_s(y)`` with its gradient: from materialised logits (the naive path), or
from hidden states and the lm_head in chunks (the fused path), where each chunk's [c, V] logits
are recomputed in backward (activation checkpointing), so only one chunk's logits exist at a
time. The fused divergence computes its gradients inside its forward and cannot return a
differentiable log-probability, hence this second, small pass over the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def pg_loss_N(student_logprob_N: torch.Tensor, advantage_N: torch.Tensor) -> torch.Tensor:
    """``-A * log p_s(y)`` per token, [N]; the gradient flows into the log-probabilities only."""
    return -(advantage_N.detach().to(student_logprob_N.dtype) * student_logprob_N)


def sampled_logprob(
    logits_NV: torch.Tensor, sampled_ids_N: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Differentiable ``log softmax(logits / temperature)[y]``, [N, V] -> [N], in fp32 (float64
    stays float64)."""
    dtype = torch.promote_types(logits_NV.dtype, torch.float32)
    z_NV = logits_NV.to(dtype)
    if temperature != 1.0:
        z_NV = z_NV / temperature
    return -F.cross_entropy(z_NV, sampled_ids_N.long(), reduction="none")


def _chunk_logprob(
    hidden_cH: torch.Tensor,
    weight_VH: torch.Tensor,
    bias_V: torch.Tensor | None,
    ids_c: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    logits_cV = F.linear(hidden_cH.to(weight_VH.dtype), weight_VH, bias_V)
    return sampled_logprob(logits_cV, ids_c, temperature)


def sampled_logprob_fused(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    sampled_ids_N: torch.Tensor,
    *,
    bias_V: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> torch.Tensor:
    """:func:`sampled_logprob` of ``hidden_NH @ weight_VH.T + bias_V`` without keeping [N, V]:
    chunks of ``chunk_size`` tokens, each recomputed in backward. Gradients reach the hidden
    states and, when they require grad, the head's weight and bias."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden_NH.shape[0] == 0:
        return hidden_NH.new_zeros(0, dtype=torch.promote_types(hidden_NH.dtype, torch.float32)) + (
            hidden_NH.sum() * 0  # attached, so backward on an empty step still runs
        )
    parts = []
    for start in range(0, hidden_NH.shape[0], chunk_size):
        end = start + chunk_size
        args = (hidden_NH[start:end], weight_VH, bias_V, sampled_ids_N[start:end], temperature)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logprob, *args, use_reentrant=False))
        else:
            parts.append(_chunk_logprob(*args))
    return torch.cat(parts)
