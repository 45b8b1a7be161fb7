"""Verifiable rewards beside the teacher: the reward interface and GRPO's group advantages.

A reward scores a completion's text against its example (the gold ``answer``); the trainer turns
the ``n`` rewards of each prompt into group-normalised advantages and adds the policy-gradient
term of ``opsd_mm.loss.policy_gradient`` next to the distillation term (``loss.reward_weight``,
``loss.distill_weight``; docs/rewards.md). The core only defines the interface: the
implementations (math-verify, multiple choice) live next to evaluation's grading
(``opsd_mm.eval.rewards``) and are handed to the trainer by ``cli.py``, as processors are.

Shapes: ``P`` prompts of a step, ``G`` samples per prompt (``rollout.n``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from opsd_mm.types import Example

# GRPO's epsilon in (r - mean) / (std + eps), as TRL's GRPOTrainer (1e-4).
ADVANTAGE_EPS = 1e-4


@dataclass(frozen=True)
class RewardScore:
    """One completion's reward. ``failure`` names why it could not be scored normally
    (``timeout``: the symbolic check passed its deadline; ``no_answer``: nothing to extract, e.g.
    no ``\\boxed{}``; ``error``: the checker raised; ``no_gold``: the example has no answer). A
    failed item's ``value`` is 0: it still takes part in its group, as a wrong answer.
    ``graded_by_guard``: scored normally, but by string comparison because the answer was beyond
    symbolic evaluation (an exponent tower, a huge integer); counted, not a failure."""

    value: float
    failure: str | None = None
    graded_by_guard: bool = False


@runtime_checkable
class Reward(Protocol):
    """``reward(examples_N, completions_N) -> scores_N``: one score per (example, completion
    text) pair, in order. Batched so that an implementation may parallelise or share a worker;
    each item gets its own deadline."""

    name: str

    def __call__(
        self, examples: Sequence[Example], completions: Sequence[str]
    ) -> list[RewardScore]: ...


def group_advantages(
    rewards_PG: torch.Tensor, eps: float = ADVANTAGE_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's group-normalised advantages: ``A = (r - mean_group) / (std_group + eps)``.

    The std is the *sample* std (Bessel's n - 1), as TRL's GRPOTrainer computes it (its
    ``nanstd`` applies ``count / (count - 1)``; default ``scale_rewards="group"``), so that a
    recipe's advantages carry over. With G = 2 and rewards (0, 1): std = 0.707, A = +-0.707
    (the population std would give +-1). A group whose rewards are all equal (or of one sample)
    has no signal: its advantages are exactly 0 and it is flagged in ``zero_P``.

    Returns ``(advantages_PG, zero_P)``: fp32 advantages and a bool flag per group.
    """
    r_PG = rewards_PG.to(torch.float32)
    n_groups, size = r_PG.shape
    mean_P1 = r_PG.mean(dim=1, keepdim=True)
    if size > 1:
        std_P1 = r_PG.std(dim=1, keepdim=True, correction=1)
    else:
        std_P1 = torch.zeros(n_groups, 1)
    zero_P = (r_PG == r_PG[:, :1]).all(dim=1)
    adv_PG = (r_PG - mean_P1) / (std_P1 + eps)
    adv_PG = torch.where(zero_P[:, None], torch.zeros_like(adv_PG), adv_PG)
    return adv_PG, zero_P


FAILURE_KINDS = ("timeout", "no_answer", "error", "no_gold")


def reward_metrics(
    rewards_PG: torch.Tensor,
    zero_P: torch.Tensor,
    scores: Sequence[RewardScore],
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Per-step reward metrics: the mean reward, the fraction of groups with zero variance (no
    learning signal from the reward), the step's failures by kind (``reward/failed_*``) and the
    completions graded by the guard (``reward/graded_by_guard``).

    ``reduce_sum`` sums a tensor over processes (the trainer passes accelerate's): the metrics
    are then the step's over every process - each process scores only its own prompts, and the
    main process alone writes metrics.jsonl. Collective: every process must call it."""
    sums = torch.tensor(
        [
            rewards_PG.double().sum().item(),
            rewards_PG.numel(),
            zero_P.double().sum().item(),
            zero_P.numel(),
            *(sum(s.failure == kind for s in scores) for kind in FAILURE_KINDS),
            sum(s.graded_by_guard for s in scores),
        ],
        dtype=torch.float64,
    )
    if reduce_sum is not None:
        sums = reduce_sum(sums)
    total, n, zero, groups, *failed, by_guard = sums.tolist()
    out = {
        "reward/mean": total / n if n else float("nan"),
        "reward/zero_variance_groups": zero / groups if groups else 0.0,
    }
    for kind, count in zip(FAILURE_KINDS, failed):
        out[f"reward/failed_{kind}"] = int(count)
    out["reward/graded_by_guard"] = int(by_guard)
    return out
