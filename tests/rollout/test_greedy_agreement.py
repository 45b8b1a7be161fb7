"""opsd_mm.testing.greedy: how the vLLM tests compare greedy completions from two engines (equal,
or parting at a near tie of the reference model), checked here on the tiny text model where a
tie can be made by hand. The VL reference forward: tests/processors/test_greedy_reference.py."""

from __future__ import annotations

import copy

import pytest
import torch

from opsd_mm.config import ProcessorConfig
from opsd_mm.processors import build_processor
from opsd_mm.rollout.hf import HFEngine
from opsd_mm.testing.greedy import NEAR_TIE_NATS, greedy_mismatch, next_token_logprobs
from opsd_mm.types import Example, Rollout, SamplingConfig

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def setup(tiny_text_dir):
    from transformers import AutoModelForCausalLM

    proc = build_processor(ProcessorConfig(), str(tiny_text_dir), "qwen3")
    model = AutoModelForCausalLM.from_pretrained(tiny_text_dir, dtype=torch.float32).eval()
    prompts = [
        proc.student_prompt(Example(id=f"q{i}", question=q))
        for i, q in enumerate(["Compute 3 + 4.", "Name a prime."])
    ]
    want = HFEngine.for_processor(model, proc).generate(prompts, 1, GREEDY)
    return proc, model, prompts, want


def _with(rollouts_P_G, p_idx, ids):
    out = [
        [Rollout(completion_ids=list(r.completion_ids), finish_reason="length") for r in rs]
        for rs in rollouts_P_G
    ]
    out[p_idx][0] = Rollout(completion_ids=list(ids), finish_reason="length")
    return out


def test_the_reference_forward_is_greedy_along_hf_generate(setup):
    """Every token HF's generate chose greedily is the argmax of the reference forward given
    the prompt and the tokens before it (suppressed ids excluded, as generate excludes them) -
    up to a near tie: generate's cached forward and this full one are two computations."""
    proc, model, prompts, want = setup
    for prompt, (r,) in zip(prompts, want):
        assert len(r.completion_ids) > 1
        for k, tok in enumerate(r.completion_ids):
            lp_V = next_token_logprobs(model, prompt, r.completion_ids[:k])
            lp_V[list(proc.suppress_token_ids)] = -torch.inf
            assert float(lp_V.max() - lp_V[tok]) <= NEAR_TIE_NATS, (k, tok)


def test_equal_completions_agree_and_a_far_token_does_not(setup):
    _, model, prompts, want = setup
    assert greedy_mismatch(model, prompts, want, want) is None
    ids = list(want[1][0].completion_ids)
    k = len(ids) // 2
    lp_V = next_token_logprobs(model, prompts[1], ids[:k])
    far = int(lp_V.argmin())
    got = _with(want, 1, ids[:k] + [far] + ids[k + 1 :])
    msg = greedy_mismatch(model, prompts, got, want)
    assert msg is not None and msg.startswith(f"prompt 1, token {k}: {far} vs {ids[k]}")


def test_a_prefix_or_a_shape_difference_never_agrees(setup):
    _, model, prompts, want = setup
    ids = list(want[0][0].completion_ids)
    assert "prefix" in greedy_mismatch(model, prompts, _with(want, 0, ids[:-1]), want)
    assert "shapes differ" in greedy_mismatch(model, prompts, want[:1], want)


def test_a_made_tie_is_accepted_and_nothing_after_it_is_compared(setup):
    """Copy token t's head row to another token u: both get the same logit wherever t was the
    argmax, so an engine may pick u there and continue differently - and only that is
    forgiven; the same swap on the untouched model is 'far apart'."""
    proc, model, prompts, want = setup
    ids = list(want[0][0].completion_ids)
    t = ids[0]
    suppressed = set(proc.suppress_token_ids) | set(ids) | set(prompts[0].input_ids)
    u = next(i for i in range(model.config.vocab_size) if i not in suppressed)
    tied = copy.deepcopy(model)
    tied.config.tie_word_embeddings = False
    with torch.no_grad():
        tied.lm_head.weight = torch.nn.Parameter(tied.lm_head.weight.clone())
        tied.lm_head.weight[u] = tied.lm_head.weight[t]
    lp_V = next_token_logprobs(tied, prompts[0], [])
    # Equal head rows; their two dot products may still round apart in the last bits.
    assert abs(float(lp_V[u] - lp_V[t])) < 1e-6
    got = _with(want, 0, [u] + [ids[-1]] * (len(ids) - 1))  # anything after the tie
    assert greedy_mismatch(tied, prompts, got, want) is None
    assert "apart under the reference model" in greedy_mismatch(model, prompts, got, want)
