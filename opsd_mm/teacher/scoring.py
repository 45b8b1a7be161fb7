"""``teacher.scoring=server``: the live teacher's log-probabilities scored by the generation server.

Why: with a live teacher the server already holds exactly the weights being trained (synced
after every optimizer step), so it can run the teacher forward in the teacher context, on the
device and kernels it generates with, while the trainer runs only the student forward and
backward. It returns, per completion token, what the loss reads of the teacher: log p_t(y) of
the token itself (``loss.divergence=sampled_pg``) and the teacher's top-k ids and
log-probabilities (``loss.top_k``), full-vocabulary normalised at temperature 1
(``opsd_mm.rollout.server``, ``VLLMEngine.score``). A full-vocabulary divergence would need the whole
[N, V] distribution over HTTP, so it stays local.

The trainer asks once per step for every row (:func:`score_pairs`, phase ``teacher_score``);
each micro-batch then takes its rows' scores as tensors in loss-token order
(:func:`teacher_logprobs`), and ``micro_batch_loss`` skips its teacher forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opsd_mm.rollout.base import ScoringEngine
from opsd_mm.types import Pair, Prompt, TeacherLogprobs, TeacherScores


def score_pairs(engine: ScoringEngine, pairs: Sequence[Pair], top_k: int) -> None:
    """Score every pair's completion after its teacher prompt on ``engine`` (the server's
    client or a colocated ``VLLMEngine``) and attach the result
    as ``pair.teacher_scores``. The teacher-only images go with the teacher prompt."""
    if not pairs:
        return
    prompts = [
        Prompt(
            input_ids=list(p.teacher.input_ids) + list(p.completion_ids),
            images=list(p.teacher.images),
            meta={"key": p.example_id},
        )
        for p in pairs
    ]
    starts = [len(p.teacher.input_ids) for p in pairs]
    scores = engine.score(prompts, starts, top_k)
    for pair, score in zip(pairs, scores, strict=True):
        if len(score.logprobs) != len(pair.completion_ids):
            raise RuntimeError(
                f"example '{pair.example_id}': the teacher scores cover {len(score.logprobs)} "
                f"tokens of a {len(pair.completion_ids)}-token completion"
            )
        pair.teacher_scores = score


def teacher_logprobs(pairs: Sequence[Pair], mask_BC: torch.Tensor, top_k: int) -> TeacherLogprobs:
    """The micro-batch's teacher scores laid out like its ``completion_ids_BC`` (row b = pair
    b, completion token j at column j) and selected with the loss mask, so token n here is
    token n of ``completion_ids_BC[mask_BC]`` (packing and ``loss.skip_first_tokens``
    included: both act on the same [B, C] mask). ``top_k`` 0: the sampled token only."""
    batch_B, width_C = mask_BC.shape
    token_BC = torch.zeros(batch_B, width_C, dtype=torch.float32)
    ids_BCK = torch.zeros(batch_B, width_C, top_k, dtype=torch.long)
    topk_BCK = torch.zeros(batch_B, width_C, top_k, dtype=torch.float32)
    for b, pair in enumerate(pairs):
        s = pair.teacher_scores
        if s is None:
            raise RuntimeError(f"example '{pair.example_id}' was not scored by the teacher")
        n = min(len(s.logprobs), width_C)
        token_BC[b, :n] = torch.tensor(s.logprobs[:n], dtype=torch.float32)
        if top_k:
            if s.topk_ids is None or s.topk_logprobs is None:
                raise RuntimeError(f"example '{pair.example_id}': no teacher top-{top_k} scores")
            ids_BCK[b, :n] = torch.tensor(s.topk_ids[:n], dtype=torch.long).view(n, top_k)
            topk_BCK[b, :n] = torch.tensor(s.topk_logprobs[:n], dtype=torch.float32).view(n, top_k)
    mask_BC = mask_BC.cpu()
    if not top_k:
        return TeacherLogprobs(token_BC[mask_BC])
    return TeacherLogprobs(token_BC[mask_BC], ids_BCK[mask_BC], topk_BCK[mask_BC])


def scores_from_full_logprobs(
    logp_CV: torch.Tensor, ids_C: torch.Tensor, top_k: int
) -> TeacherScores:
    """:class:`TeacherScores` of one completion from the teacher's full log-distributions
    ([C, V], the positions that predict ``ids_C``): what the server computes, in torch, for
    tests and for checking a server against a local forward."""
    token = logp_CV.gather(-1, ids_C.long()[:, None]).squeeze(-1)
    if not top_k:
        return TeacherScores(token.tolist())
    top = logp_CV.topk(top_k, dim=-1)
    return TeacherScores(token.tolist(), top.indices.tolist(), top.values.tolist())
