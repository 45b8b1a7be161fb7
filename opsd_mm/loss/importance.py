"""Truncated importance weights for rollouts sampled by another engine or older weights.

Why: the completions come from the rollout engine's distribution (vLLM kernels, bf16, a server
synced every ``rollout.sync_every`` steps, one step stale when asynchronous), while the loss
treats them as samples of the trainer's current student. Weighting each token's loss by
``w = min(p_trainer(y) / p_rollout(y), c)`` corrects the sampling distribution token by token
(truncated importance sampling: the truncation at ``c`` bounds the variance that rare tokens,
much likelier under the trainer than under the engine, would otherwise add).

Semantics, matched to TRL 1.16 (``trl.experimental.sdft.loss_utils.
apply_importance_sampling_clipping``, used by SDFT/SDPO as ``distillation_is_clip``):

    w = exp(clamp(log p_trainer(y) - log p_rollout(y), -20, 20)).clamp(max=c), detached

- only an upper clip (TRL's ``token_truncate`` mode of ``vllm_importance_sampling_*`` in GRPO
  also offers a lower bound, unused by the distillation trainers);
- the weight is detached: it rescales the per-token loss, no gradient flows through it;
- a token without a rollout log-prob (NaN: an engine that reports none, like ``hf``, which
  samples from the trainer's own weights anyway) gets weight 1, as GRPO's ``nan_to_num`` does.

One difference: TRL's SDFT takes ``old_per_token_logps`` from the *trainer's* own forward
before the update (and only when a generation batch spans several optimizer steps), so it
corrects staleness but not engine mismatch. Ours takes the rollout engine's own log-probs
(``Rollout.logprobs``: vLLM's raw, temperature-1 log p of the sampled token), so one weight
covers both, at no extra forward. Both sides are temperature-1 log-probs of the sampled token
(``DivergenceOut.student_logprob_N``), whatever the loss temperature.
"""

from __future__ import annotations

import torch

LOG_RATIO_BOUND = 20.0  # TRL's clamp: exp(20) ~ 5e8, no overflow before the clip


def importance_weights(
    trainer_logprob_N: torch.Tensor, rollout_logprob_N: torch.Tensor, clip: float
) -> torch.Tensor:
    """``w_N = min(p_trainer / p_rollout, clip)`` per token, fp32, detached; 1 where the rollout
    log-prob is NaN (unknown)."""
    log_ratio_N = (
        trainer_logprob_N.detach().float() - rollout_logprob_N.to(trainer_logprob_N.device).float()
    )
    log_ratio_N = torch.nan_to_num(log_ratio_N, nan=0.0)
    log_ratio_N = log_ratio_N.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    return log_ratio_N.exp().clamp(max=clip)


def weighted_loss_sum(
    loss_N: torch.Tensor,
    trainer_logprob_N: torch.Tensor,
    rollout_logprob_N: torch.Tensor | None,
    clip: float | None,
) -> torch.Tensor:
    """``sum_n w_n * loss_n`` (``sum_n loss_n`` when ``clip`` is None or there are no rollout
    log-probs): the naive path's loss before the normalising scale."""
    if clip is None or rollout_logprob_N is None:
        return loss_N.sum()
    return (loss_N * importance_weights(trainer_logprob_N, rollout_logprob_N, clip)).sum()


def importance_metrics(
    trainer_logprob_N: torch.Tensor, rollout_logprob_N: torch.Tensor, clip: float
) -> dict[str, float]:
    """A step's importance weights, for metrics.jsonl: the mean truncated weight, the fraction
    of tokens whose ratio p_trainer / p_rollout exceeds ``clip`` (so the truncation changed
    them), and the largest untruncated ratio. Tokens without a rollout log-prob count as
    ratio 1. NaN when there are no tokens."""
    if trainer_logprob_N.numel() == 0:
        nan = float("nan")
        return {
            "importance/weight_mean": nan,
            "importance/clip_fraction": nan,
            "importance/ratio_max": nan,
        }
    ratio_N = importance_weights(trainer_logprob_N, rollout_logprob_N, float("inf"))
    return {
        "importance/weight_mean": ratio_N.clamp(max=clip).mean().item(),
        "importance/clip_fraction": (ratio_N > clip).float().mean().item(),
        "importance/ratio_max": ratio_N.max().item(),
    }
