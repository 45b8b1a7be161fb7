"""VLLMEngine on the tiny text model: greedy parity with HFEngine, token-id prompts, n samples,
seeding, suppression and the sampled tokens' log-probabilities."""

from __future__ import annotations

import pytest
import torch

from opsd_mm.config import RolloutConfig
from opsd_mm.rollout.hf import HFEngine
from opsd_mm.testing.greedy import greedy_mismatch
from opsd_mm.train.metrics import logprob_gap, pad_logprobs
from opsd_mm.types import SamplingConfig

pytestmark = pytest.mark.vllm

# Beyond the processor's own suppressed ids, most of the vocabulary is suppressed too, so a
# leak would show within a few sampled tokens (the tiny model is near-uniform).
EXTRA_SUPPRESSED = range(200, 1200)


@pytest.fixture(scope="module")
def engines(text_setup):
    """(vLLM engine, HF engine, suppressed ids), sharing one tiny model and one setting."""
    from opsd_mm.rollout.vllm_engine import VLLMEngine

    path, proc, model = text_setup
    suppressed = sorted(set(proc.suppress_token_ids) | set(EXTRA_SUPPRESSED))
    vllm_engine = VLLMEngine(
        path,
        RolloutConfig(engine="vllm"),
        dtype="float32",
        seed=0,
        max_model_len=512,
        suppress_token_ids=suppressed,
        eos_token_ids=proc.eos_token_ids,
    )
    hf_engine = HFEngine(
        model,
        pad_token_id=proc.pad_token_id,
        eos_token_ids=proc.eos_token_ids,
        suppress_token_ids=suppressed,
    )
    yield vllm_engine, hf_engine, set(suppressed)
    vllm_engine.close()


def test_greedy_matches_hf_engine(engines, text_prompts):
    vllm_engine, hf_engine, _ = engines
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=32)
    got = vllm_engine.generate(text_prompts, 1, greedy)
    want = hf_engine.generate(text_prompts, 1, greedy)
    assert greedy_mismatch(hf_engine.model, text_prompts, got, want) is None
    same = [a[0].completion_ids == b[0].completion_ids for a, b in zip(got, want)]
    assert [a[0].finish_reason for a, s in zip(got, same) if s] == [
        b[0].finish_reason for b, s in zip(want, same) if s
    ]
    assert all(len(rs[0].completion_ids) > 0 for rs in got)


def test_n_samples_logprobs_and_suppression(engines, text_prompts, text_setup, trainer_logprobs):
    vllm_engine, _, suppressed = engines
    _, _, model = text_setup
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=24, seed=7)
    rollouts_P_G = vllm_engine.generate(text_prompts, 3, sampling)
    assert [len(rs) for rs in rollouts_P_G] == [3] * len(text_prompts)
    engine_lps, trainer_lps = [], []
    for prompt, rollouts in zip(text_prompts, rollouts_P_G):
        assert len({tuple(r.completion_ids) for r in rollouts}) > 1  # samples differ
        for r in rollouts:
            assert not suppressed & set(r.completion_ids)
            assert r.logprobs is not None and len(r.logprobs) == len(r.completion_ids)
            engine_lps.append(r.logprobs)
            trainer_lps.append(trainer_logprobs(model, prompt.input_ids, r.completion_ids))
    width = max(len(lp) for lp in engine_lps)
    engine_BC = pad_logprobs(engine_lps, width)
    trainer_BC = pad_logprobs([t.tolist() for t in trainer_lps], width)
    gap = logprob_gap(engine_BC.flatten(), trainer_BC.flatten())
    assert gap < 1e-4, f"rollout/trainer log-prob gap {gap} on fp32 weights"
    # Raw log-probs of the full distribution: suppressed ids still carry mass, so they are < 0.
    assert all(lp < 0 for lps in engine_lps for lp in lps)


def test_seeded_sampling_is_per_row(engines, text_prompts):
    """A completion depends on (seed, prompt key, sample index) only: not on the batch."""
    vllm_engine, _, _ = engines
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=11)
    batch = vllm_engine.generate(text_prompts, 2, sampling)
    alone = vllm_engine.generate(text_prompts[3:4], 2, sampling)
    again = vllm_engine.generate(text_prompts, 2, sampling)
    ids = [[r.completion_ids for r in rs] for rs in batch]
    assert [[r.completion_ids for r in rs] for rs in alone] == ids[3:4]
    assert [[r.completion_ids for r in rs] for rs in again] == ids
    other = vllm_engine.generate(text_prompts, 2, SamplingConfig(1.0, max_new_tokens=16, seed=12))
    assert [[r.completion_ids for r in rs] for rs in other] != ids


def test_seeded_batch_larger_than_one_prefill_step(engines, text_prompts):
    """More prompt tokens than one engine step schedules (4096): on the CPU build a chunked
    prefill of a seeded request crashed vLLM ("CPU Generator does not use offset")."""
    vllm_engine, _, _ = engines
    n = -(-4200 // sum(len(p.input_ids) for p in text_prompts))
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=4, seed=13)
    big = vllm_engine.generate(text_prompts, n, sampling)
    alone = vllm_engine.generate(text_prompts[-1:], n, sampling)
    assert [r.completion_ids for r in big[-1]] == [r.completion_ids for r in alone[0]]


def test_prompt_too_long_names_the_prompt(engines, text_prompts):
    vllm_engine, _, _ = engines
    from opsd_mm.types import Prompt

    long = Prompt(input_ids=text_prompts[0].input_ids * 200, meta={"key": "too-long"})
    with pytest.raises(ValueError, match="too-long"):
        vllm_engine.generate([long], 1, SamplingConfig(max_new_tokens=4))


def test_length_finish_and_empty_batch(engines, text_prompts):
    vllm_engine, _, _ = engines
    assert vllm_engine.generate([], 2, SamplingConfig()) == []
    (rollouts,) = vllm_engine.generate(text_prompts[:1], 1, SamplingConfig(0.0, max_new_tokens=3))
    if rollouts[0].finish_reason == "length":
        assert len(rollouts[0].completion_ids) == 3
    assert torch.isfinite(torch.tensor(rollouts[0].logprobs)).all()
