"""The transformers ``generate`` rollout engine (CPU and GPU), and its per-row seeded sampler.

Why our own sampling step: ``generate``'s sampler draws from one global RNG, so a completion
depends on which other prompts share its batch (and on the process count under DDP). We run
``generate`` greedily over logits that ``RowSeededSampler`` has already collapsed onto a token
drawn from that row's own generator, seeded by (step seed, prompt key, sample index). Completions
are then a function of the prompt and the seed alone - the same on 1 or N processes, in any
batch - which makes resume and multi-process runs reproducible.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from opsd_mm.types import Prompt, Rollout, SamplingConfig


def row_seed(seed: int, key: str, sample: int) -> int:
    """A stable 63-bit seed for one (step seed, prompt key, sample index) row."""
    digest = hashlib.sha256(f"{seed}|{key}|{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def filter_logits(logits_BV: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering (filtered entries set to -inf)."""
    logits_BV = logits_BV.float() / max(sampling.temperature, 1e-6)
    if sampling.top_k and sampling.top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, sampling.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_BV, idx_BV = torch.sort(logits_BV, descending=True, dim=-1)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        # Drop tokens once the mass before them already reaches top_p (keep at least one).
        drop_BV = (cum_BV - sorted_BV.softmax(-1)) >= sampling.top_p
        drop_BV[:, 0] = False
        logits_BV = logits_BV.masked_fill(
            torch.zeros_like(drop_BV).scatter(-1, idx_BV, drop_BV), float("-inf")
        )
    if sampling.min_p > 0.0:
        probs_BV = logits_BV.softmax(-1)
        floor_B1 = sampling.min_p * probs_BV.max(-1, keepdim=True).values
        logits_BV = logits_BV.masked_fill(probs_BV < floor_B1, float("-inf"))
    return logits_BV


class RowSeededSampler:
    """A ``LogitsProcessor`` that samples each row from its own generator and returns logits
    that are -inf except at the drawn token, so greedy decoding emits exactly that token."""

    def __init__(self, seeds: Sequence[int], sampling: SamplingConfig) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.sampling = sampling

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs_BV = filter_logits(scores, self.sampling).softmax(-1)
        u_B = torch.stack([torch.rand((), generator=g) for g in self.generators])
        cdf_BV = probs_BV.cumsum(-1)
        u_B1 = (u_B.to(cdf_BV.device) * cdf_BV[:, -1]).unsqueeze(-1)
        token_B = torch.searchsorted(cdf_BV, u_B1).squeeze(-1).clamp(max=scores.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, token_B.unsqueeze(-1), 0.0)
        return out


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists -> (ids_BP, attention_mask_BP)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def split_completion(row: Sequence[int], eos_ids: set[int]) -> Rollout:
    """Cut a generated row at its first EOS (kept) -> Rollout with the finish reason."""
    for i, tok in enumerate(row):
        if tok in eos_ids:
            return Rollout(completion_ids=list(row[: i + 1]), finish_reason="eos")
    return Rollout(completion_ids=list(row), finish_reason="length")


class HFEngine:
    """Batched ``model.generate`` over token-id prompts (plus the model's multimodal tensors).

    ``batch_size`` bounds the rows generated at once (prompts x samples); None means all.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_token_id: int,
        eos_token_ids: Sequence[int],
        suppress_token_ids: Sequence[int] = (),
        batch_size: int | None = None,
    ) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.suppress_token_ids = list(suppress_token_ids)
        self.batch_size = batch_size

    @classmethod
    def for_processor(
        cls, model: torch.nn.Module, processor: Any, batch_size: int | None = None
    ) -> HFEngine:
        """An engine with the processor's pad, EOS and never-generate token ids."""
        return cls(
            model,
            pad_token_id=processor.pad_token_id,
            eos_token_ids=processor.eos_token_ids,
            suppress_token_ids=processor.suppress_token_ids,
            batch_size=batch_size,
        )

    @classmethod
    def from_config(
        cls, cfg: Any, model: torch.nn.Module, model_path: str, processor: Any
    ) -> HFEngine:
        """``rollout.engine=hf``: generates with the model being trained."""
        return cls.for_processor(model, processor)

    def sync_weights(self, model: torch.nn.Module, version: int | None = None) -> None:
        """The HF engine samples from the training model itself: nothing to copy, and its
        rollouts carry no weight version (they are never stale)."""
        self.model = model

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Prompt], n: int, sampling: SamplingConfig
    ) -> list[list[Rollout]]:
        rows = [(p_idx, j) for p_idx in range(len(prompts)) for j in range(n)]
        out: list[list[Rollout]] = [[] for _ in prompts]
        if not rows:  # every example of the step was skipped
            return out
        step = self.batch_size or len(rows)
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            rollouts = self._generate_rows([prompts[i] for i, _ in chunk], chunk, sampling)
            for (p_idx, _), r in zip(chunk, rollouts):
                out[p_idx].append(r)
        return out

    def _generate_rows(
        self, prompts: list[Prompt], rows: list[tuple[int, int]], sampling: SamplingConfig
    ) -> list[Rollout]:
        model = self.model
        device = next(model.parameters()).device
        ids_BP, mask_BP = left_pad([p.input_ids for p in prompts], self.pad_token_id)
        kwargs: dict[str, torch.Tensor] = {
            "input_ids": ids_BP.to(device),
            "attention_mask": mask_BP.to(device),
        }
        if prompts[0].token_type_ids is not None:
            tt_BP, _ = left_pad([p.token_type_ids or [] for p in prompts], 0)
            kwargs["mm_token_type_ids"] = tt_BP.to(device)
        for key in prompts[0].mm_inputs:
            kwargs[key] = torch.cat([p.mm_inputs[key] for p in prompts]).to(device)
        greedy = sampling.temperature <= 0
        processors = []
        if not greedy:
            base = sampling.seed if sampling.seed is not None else torch.seed()
            seeds = [
                row_seed(base, str(p.meta.get("key", i)), j) for p, (i, j) in zip(prompts, rows)
            ]
            from transformers import LogitsProcessorList

            processors = LogitsProcessorList([RowSeededSampler(seeds, sampling)])
        was_training = model.training
        model.eval()
        try:
            generated = model.generate(
                **kwargs,
                do_sample=False,
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
                suppress_tokens=self.suppress_token_ids or None,
                logits_processor=processors or None,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        finally:
            model.train(was_training)
        new_BC = generated[:, ids_BP.shape[1] :].tolist()
        eos = set(self.eos_token_ids)
        return [split_completion(row, eos) for row in new_BC]
