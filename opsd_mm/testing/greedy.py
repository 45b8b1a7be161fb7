"""Greedy completions from two engines compared the way two different computations must be:
equal token for token, except where the reference model itself finds a near tie.

Why not plain equality: vLLM and transformers compute the same logits through different kernels,
so on another CPU (another SIMD width, another BLAS) two candidates a few ulps apart can swap
order, and from there the two greedy continuations legitimately part. Plain equality then fails
on a correct engine. The rule here keeps what the equality was for: at the first position where
the two completions differ, the reference model (a plain transformers forward over the prompt and
the shared prefix, images included) must rate both tokens within ``tol`` nats of each other;
anything past that position is not compared, since the contexts differ. A completion that is a
strict prefix of the other (one stopped, the other went on without an end token) never passes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opsd_mm.types import Prompt, Rollout

# Both sides run fp32 here; their log-prob gap is measured below 1e-4 nats, so two candidates
# that swap must already sit within a few times that of each other.
NEAR_TIE_NATS = 1e-3


@torch.no_grad()
def next_token_logprobs(
    model: torch.nn.Module, prompt: Prompt, prefix: Sequence[int]
) -> torch.Tensor:
    """log p(. | prompt, prefix) over the vocabulary from one forward: the prompt's own
    multimodal tensors (pixels, grids) go in as the engines receive them; completion tokens
    carry token type 0 (text)."""
    device = next(model.parameters()).device
    ids = list(prompt.input_ids) + list(prefix)
    kwargs: dict[str, torch.Tensor] = {"input_ids": torch.tensor([ids], device=device)}
    if prompt.token_type_ids is not None:
        types = list(prompt.token_type_ids) + [0] * len(prefix)
        kwargs["mm_token_type_ids"] = torch.tensor([types], device=device)
    for key, value in prompt.mm_inputs.items():
        kwargs[key] = value.to(device)
    was_training = model.training
    model.eval()
    try:
        logits_1LV = model(**kwargs).logits
    finally:
        model.train(was_training)
    return logits_1LV[0, -1].float().log_softmax(-1)


def greedy_mismatch(
    model: torch.nn.Module,
    prompts: Sequence[Prompt],
    got_P_G: Sequence[Sequence[Rollout]],
    want_P_G: Sequence[Sequence[Rollout]],
    tol: float = NEAR_TIE_NATS,
) -> str | None:
    """None when every pair of greedy completions agrees (equal, or parting at a near tie of
    the reference ``model``); else a sentence naming the first prompt and position that does
    not."""
    if [len(rs) for rs in got_P_G] != [len(rs) for rs in want_P_G] or len(got_P_G) != len(prompts):
        return f"shapes differ: {[len(r) for r in got_P_G]} vs {[len(r) for r in want_P_G]}"
    for p_idx, (prompt, got_G, want_G) in enumerate(zip(prompts, got_P_G, want_P_G)):
        for got, want in zip(got_G, want_G):
            a, b = list(got.completion_ids), list(want.completion_ids)
            if a == b:
                continue
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            if k is None:
                return f"prompt {p_idx}: one completion is a prefix of the other ({len(a)} vs {len(b)} tokens)"
            lp_V = next_token_logprobs(model, prompt, a[:k])
            gap = abs(float(lp_V[a[k]] - lp_V[b[k]]))
            if gap > tol:
                return (
                    f"prompt {p_idx}, token {k}: {a[k]} vs {b[k]}, {gap:.3g} nats apart under "
                    f"the reference model (a near tie is within {tol:g})"
                )
    return None
