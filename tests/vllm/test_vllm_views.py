"""Per-role image views with the colocated vLLM engine (tiny Qwen2.5-VL): the student's view (a
lower resolution, a random crop, a random blur, seeded per example) is what vLLM samples from -
its log-probs are the student forward's on the same pixels, its greedy completions HF's - and
the teacher's view (a higher resolution, the region zoomed as an extra image, the box marked)
is what vLLM scores for ``teacher.scoring=server``: equal to the transformers teacher forward.
The same through the generation server, where the images travel as PNG.
The engine receives ``Prompt.images``, the images after the view, and re-expands their
placeholders itself; a different resize there would be refused by the engine (a prompt of
another length), so these tests also show vLLM keeps the view's sizes."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from opsd_mm.config import ProcessorConfig, RolloutConfig
from opsd_mm.config.sections import ViewOpConfig
from opsd_mm.rollout.hf import HFEngine
from opsd_mm.testing.greedy import greedy_mismatch
from opsd_mm.types import Prompt, Region, SamplingConfig
from tests.fixtures.vl_examples import EXAMPLES, FROZEN

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("torchvision") is None,
        reason="Qwen-VL processing needs torchvision",
    ),
]

TEACHER = [
    ViewOpConfig("resolution", max_pixels=40_000),
    ViewOpConfig("zoom", placement="extra", margin=0.2, pixels=6_000),
    ViewOpConfig("mark", width=2),
]
STUDENT = [
    ViewOpConfig("resolution", max_pixels=6_000),
    ViewOpConfig("random_crop", scale=0.7),
    ViewOpConfig("blur", radius=1.5, p=0.5),
]
WITH_REGIONS = (
    dataclasses.replace(EXAMPLES[0], regions=(Region(0, (0.0, 0.0, 0.5, 0.5), normalized=True),)),
    dataclasses.replace(
        FROZEN,
        regions=(Region(0, (20, 20, 40, 60)), Region(1, (0.2, 0.0, 0.6, 1.0), normalized=True)),
    ),
    EXAMPLES[2],
)
TOL = 1e-4  # nats: fp32 on both sides, two different computations (vLLM's kernels, HF's)


@pytest.fixture(scope="module")
def views(tiny_cache):
    from transformers import AutoModelForImageTextToText

    from opsd_mm.model.tiny import resolve_tiny
    from opsd_mm.processors import build_processor
    from opsd_mm.rollout.vllm_engine import VLLMEngine

    path = str(resolve_tiny("qwen2.5-vl", tiny_cache))
    cfg = ProcessorConfig(student_view=STUDENT, teacher_view=TEACHER)
    proc = build_processor(cfg, path, "qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    engine = VLLMEngine(
        path,
        RolloutConfig(engine="vllm"),
        dtype="float32",
        seed=0,
        max_model_len=2048,
        suppress_token_ids=proc.suppress_token_ids,
        eos_token_ids=proc.eos_token_ids,
    )
    prompts = []
    for k, ex in enumerate(WITH_REGIONS):
        p = proc.student_prompt(ex, seed=100 + k)
        p.meta["key"] = ex.id
        prompts.append(p)
    yield proc, model, engine, prompts, path
    engine.close()


def test_the_views_differ_from_the_plain_prompt(views):
    """Guard: the student sees fewer image tokens than the teacher on every example, and the
    teacher gets the zoomed regions as extra images."""
    proc, _, _, prompts, _ = views
    for ex, p in zip(WITH_REGIONS, prompts):
        teacher = proc.teacher_prompt(ex)
        assert p.meta["image_tokens"] < teacher.meta["image_tokens"], ex.id
    assert len(proc.teacher_prompt(WITH_REGIONS[1]).images) == 2 + 2 + 1


def test_vllm_samples_from_the_students_view(views, engine_gap):
    proc, model, engine, prompts, _ = views
    rollouts = engine.generate(prompts, 2, SamplingConfig(1.0, max_new_tokens=12, seed=3))
    assert engine_gap(proc, model, list(WITH_REGIONS), prompts, rollouts) < TOL
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    got = engine.generate(prompts, 1, greedy)
    want = HFEngine.for_processor(model, proc).generate(prompts, 1, greedy)
    assert greedy_mismatch(model, prompts, got, want) is None


def test_vllm_scores_the_teachers_view(views):
    proc, model, engine, prompts, _ = views
    rollouts = engine.generate(prompts, 1, SamplingConfig(1.0, max_new_tokens=10, seed=5))
    pairs = [
        proc.pair(ex, rs[0].completion_ids, student=p)
        for ex, p, rs in zip(WITH_REGIONS, prompts, rollouts)
    ]
    _teacher_scores_match(proc, model, engine, pairs)


def _teacher_scores_match(proc, model, engine, pairs) -> None:
    """The engine's teacher scores of ``pairs`` (teacher prompt in the teacher's view, then the
    completion) equal the transformers teacher forward's log-probs within TOL."""
    batch = proc.collate(pairs)
    P, C = batch.teacher.prompt_width, batch.completion_ids_BC.shape[1]
    with torch.no_grad():
        logits_BCV = model(**batch.teacher.model_inputs).logits[:, P - 1 : P - 1 + C]
    logp_BCV = logits_BCV.float().log_softmax(-1)
    rows = [
        Prompt(input_ids=p.teacher.input_ids + p.completion_ids, images=p.teacher.images)
        for p in pairs
    ]
    scores = engine.score(rows, [len(p.teacher.input_ids) for p in pairs], 0)
    for b, (pair, s) in enumerate(zip(pairs, scores)):
        n = len(pair.completion_ids)
        want_C = logp_BCV[b, :n].gather(-1, batch.completion_ids_BC[b, :n, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s.logprobs), want_C, rtol=0, atol=TOL)


def test_the_generation_server_samples_and_scores_the_views(views, engine_gap, tmp_path):
    """The same through ``opsd-mm serve`` (images as PNG over HTTP): the server samples from
    the student's view and scores the teacher's view as the transformers forwards do."""
    from opsd_mm.rollout.client import ServerEngine
    from opsd_mm.testing.server import ServerProcess

    proc, model, _, prompts, path = views
    srv = ServerProcess(path, max_model_len=2048)
    srv.start()
    try:
        engine = ServerEngine(
            srv.url,
            tmp_path / "sync",
            eos_token_ids=proc.eos_token_ids,
            suppress_token_ids=proc.suppress_token_ids,
        )
        rollouts = engine.generate(prompts, 2, SamplingConfig(1.0, max_new_tokens=10, seed=3))
        assert engine_gap(proc, model, list(WITH_REGIONS), prompts, rollouts) < TOL
        pairs = [
            proc.pair(ex, rs[0].completion_ids, student=p)
            for ex, p, rs in zip(WITH_REGIONS, prompts, rollouts)
        ]
        _teacher_scores_match(proc, model, engine, pairs)
        engine.release()
    finally:
        srv.stop()
