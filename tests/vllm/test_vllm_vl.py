"""VLLMEngine on the tiny Qwen-VL models: token-id prompts with images as multi_modal_data give
HFEngine's greedy completions and the trainer's log-probs, before and after a sync that
changes the vision tower. Needs an importable torchvision (``make venv-vllm`` patches it in)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from opsd_mm.config import ProcessorConfig, RolloutConfig
from opsd_mm.rollout.hf import HFEngine
from opsd_mm.testing.greedy import greedy_mismatch
from opsd_mm.types import Example, SamplingConfig

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("torchvision") is None,
        reason="Qwen-VL processing needs torchvision",
    ),
]

FAMILIES = {"qwen2-vl": "qwen2_vl", "qwen2.5-vl": "qwen2_5_vl", "qwen3-vl": "qwen3_vl"}
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=16)


def _examples() -> list[Example]:
    """Three grid-counting examples with one image, and one with two images of other sizes."""
    from opsd_mm.data.vl_tasks import draw_grid, make_vl_count_examples

    two = Example(
        id="two-images",
        question="<image 1> and <image 2>: how many red cells in total?",
        privileged="Two in the first grid, one in the second: \\boxed{3}.",
        images=(
            draw_grid({(0, 0): "red", (1, 2): "red"}, 3, 3, 20),
            draw_grid({(2, 1): "red"}, 4, 5, 16),
        ),
    )
    return [*make_vl_count_examples(3, seed=1), two]


@pytest.fixture(scope="module", params=list(FAMILIES))
def vl(request, tiny_cache):
    """(processor, fp32 HF model, vLLM engine, examples, prompts) for one tiny VL family."""
    from transformers import AutoModelForImageTextToText

    from opsd_mm.model.tiny import resolve_tiny
    from opsd_mm.processors import build_processor
    from opsd_mm.rollout.vllm_engine import VLLMEngine

    path = str(resolve_tiny(request.param, tiny_cache))
    proc = build_processor(ProcessorConfig(), path, FAMILIES[request.param])
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    engine = VLLMEngine(
        path,
        RolloutConfig(engine="vllm"),
        dtype="float32",
        seed=0,
        max_model_len=1024,
        suppress_token_ids=proc.suppress_token_ids,
        eos_token_ids=proc.eos_token_ids,
    )
    examples = _examples()
    prompts = [proc.student_prompt(ex) for ex in examples]
    for ex, p in zip(examples, prompts):
        p.meta["key"] = ex.id
    yield proc, model, engine, examples, prompts
    engine.close()


def _hf(model, proc) -> HFEngine:
    return HFEngine.for_processor(model, proc)


def _ids(rollouts_P_G):
    return [[r.completion_ids for r in rs] for rs in rollouts_P_G]


def test_vl_greedy_matches_hf_and_logprob_gap(vl, engine_gap):
    proc, model, engine, examples, prompts = vl
    assert max(len(p.images) for p in prompts) == 2
    got = engine.generate(prompts, 1, GREEDY)
    assert (
        greedy_mismatch(model, prompts, got, _hf(model, proc).generate(prompts, 1, GREEDY)) is None
    )
    sampled = engine.generate(prompts, 2, SamplingConfig(1.0, max_new_tokens=12, seed=3))
    assert engine_gap(proc, model, examples, prompts, sampled) < 1e-4


def test_vl_sync_with_trained_vision_tower(vl):
    proc, base, engine, _, prompts = vl
    model = copy.deepcopy(base)
    with torch.no_grad():  # an update to every weight, the vision tower's included
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    before = engine.generate(prompts, 1, GREEDY)
    engine.sync_weights(model)
    after = engine.generate(prompts, 1, GREEDY)
    want = _hf(model, proc).generate(prompts, 1, GREEDY)
    assert greedy_mismatch(model, prompts, after, want) is None
    assert _ids(after) != _ids(before)
    engine.sync_weights(base)  # leave the module's engine as the fixture made it
