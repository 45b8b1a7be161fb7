"""Weight sync: after optimizer steps on a LoRA (peft) model or on full weights, vLLM's greedy
completions equal HFEngine's on the updated model, and the log-prob gap stays near zero."""

from __future__ import annotations

import copy

import pytest
import torch

from opsd_mm.config import LoraConfig, ModelConfig, RolloutConfig
from opsd_mm.rollout.hf import HFEngine
from opsd_mm.testing.greedy import greedy_mismatch
from opsd_mm.types import SamplingConfig

pytestmark = pytest.mark.vllm

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=24)


@pytest.fixture(scope="module")
def engine(text_setup):
    from opsd_mm.rollout.vllm_engine import VLLMEngine

    path, proc, _ = text_setup
    engine = VLLMEngine(
        path,
        RolloutConfig(engine="vllm"),
        dtype="float32",
        seed=0,
        max_model_len=512,
        suppress_token_ids=proc.suppress_token_ids,
        eos_token_ids=proc.eos_token_ids,
    )
    yield engine
    engine.close()


def _hf(model, proc) -> HFEngine:
    return HFEngine.for_processor(model, proc)


def _ids(rollouts_P_G):
    return [[r.completion_ids for r in rs] for rs in rollouts_P_G]


def _optimizer_steps(model, proc, prompts, rollouts_P_G, steps: int, lr: float) -> None:
    """A few AdamW steps that raise the likelihood of the given completions: large enough
    that greedy decoding changes."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        loss = torch.zeros(())
        for prompt, rollouts in zip(prompts, rollouts_P_G):
            ids = prompt.input_ids + rollouts[0].completion_ids
            labels = [-100] * len(prompt.input_ids) + rollouts[0].completion_ids
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            loss = loss + out.loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_sync_after_lora_step_matches_hf(engine, text_setup, text_prompts, trainer_logprobs):
    from opsd_mm.model.load import setup_trainable

    _, proc, base = text_setup
    model = setup_trainable(
        copy.deepcopy(base), ModelConfig(lora=LoraConfig(enabled=True, r=8, alpha=16))
    )
    engine.sync_weights(model)  # the module's engine may hold another test's weights
    before = engine.generate(text_prompts, 1, GREEDY)
    want = _hf(model, proc).generate(text_prompts, 1, GREEDY)
    assert greedy_mismatch(model, text_prompts, before, want) is None

    # Train towards completions sampled elsewhere, so that greedy outputs must move.
    targets = engine.generate(text_prompts, 1, SamplingConfig(1.0, max_new_tokens=12, seed=3))
    _optimizer_steps(model, proc, text_prompts, targets, steps=3, lr=5e-2)
    stale = engine.generate(text_prompts, 1, GREEDY)
    assert _ids(stale) == _ids(before)  # nothing changes in vLLM until a sync

    engine.sync_weights(model)
    after = engine.generate(text_prompts, 1, GREEDY)
    want = _hf(model, proc).generate(text_prompts, 1, GREEDY)
    assert greedy_mismatch(model, text_prompts, after, want) is None
    assert _ids(after) != _ids(before), "the optimizer steps did not change greedy outputs"

    sampled = engine.generate(text_prompts, 2, SamplingConfig(1.0, max_new_tokens=16, seed=5))
    gaps = [
        (torch.tensor(r.logprobs) - trainer_logprobs(model, p.input_ids, r.completion_ids)).abs()
        for p, rs in zip(text_prompts, sampled)
        for r in rs
    ]
    assert torch.cat(gaps).mean().item() < 1e-4
    # The adapter is still a separate peft module in the trainer: sync merged a copy.
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_sync_full_weights_matches_hf(engine, text_setup, text_prompts):
    _, proc, base = text_setup
    model = copy.deepcopy(base)
    targets = engine.generate(text_prompts, 1, SamplingConfig(1.0, max_new_tokens=12, seed=4))
    _optimizer_steps(model, proc, text_prompts, targets, steps=2, lr=1e-2)
    engine.sync_weights(model)
    got = engine.generate(text_prompts, 1, GREEDY)
    want = _hf(model, proc).generate(text_prompts, 1, GREEDY)
    assert greedy_mismatch(model, text_prompts, got, want) is None


def test_eos_stops_and_is_kept(engine, text_setup, text_prompts):
    """A model whose argmax is always one of the two EOS ids: every completion is that single
    EOS token, kept, with finish reason "eos"."""
    _, proc, base = text_setup
    assert len(proc.eos_token_ids) >= 2, (
        "the tiny tokenizer should have <|im_end|> and <|endoftext|>"
    )
    eos_a, eos_b = proc.eos_token_ids[:2]
    model = copy.deepcopy(base)
    with torch.no_grad():
        # The final norm keeps one hidden unit d; the head reads it into eos_a (+) and eos_b (-)
        # only, so whatever the sign of unit d, an EOS logit is the unique maximum.
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos_a, 0] = 10.0
        model.lm_head.weight[eos_b, 0] = -10.0
    engine.sync_weights(model)
    got = engine.generate(text_prompts, 1, GREEDY)
    want = _hf(model, proc).generate(text_prompts, 1, GREEDY)
    assert _ids(got) == _ids(want)
    for (r,) in got:
        assert r.finish_reason == "eos"
        assert len(r.completion_ids) == 1 and r.completion_ids[0] in (eos_a, eos_b)
