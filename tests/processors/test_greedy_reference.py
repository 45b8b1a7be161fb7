"""The reference forward of opsd_mm.testing.greedy on the three tiny Qwen-VL families: given a
prompt with images (pixels, grids, token types as the processor made them) and the tokens
generated so far, its argmax is (up to a near tie) the token HF's greedy generate chose - so the vLLM tests' near-
tie rule judges VL completions with the model the engines ran."""

from __future__ import annotations

import torch

from opsd_mm.rollout.hf import HFEngine
from opsd_mm.testing.greedy import NEAR_TIE_NATS, greedy_mismatch, next_token_logprobs
from opsd_mm.types import SamplingConfig
from tests.fixtures.vl_examples import EXAMPLES


def test_reference_forward_follows_greedy_generate_with_images(proc, model):
    prompts = [proc.student_prompt(ex) for ex in EXAMPLES[:2]]
    assert all(p.mm_inputs for p in prompts)
    want = HFEngine.for_processor(model, proc).generate(
        prompts, 1, SamplingConfig(temperature=0.0, max_new_tokens=6)
    )
    for prompt, (r,) in zip(prompts, want):
        for k, tok in enumerate(r.completion_ids):
            lp_V = next_token_logprobs(model, prompt, r.completion_ids[:k])
            lp_V[list(proc.suppress_token_ids)] = -torch.inf
            # Two computations (generate's cached forward, this full one): up to a near tie.
            assert float(lp_V.max() - lp_V[tok]) <= NEAR_TIE_NATS, (k, tok)
    assert greedy_mismatch(model, prompts, want, want) is None
