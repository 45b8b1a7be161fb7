"""Per-role image views with the colocated vLLM engine, on the three tiny Qwen-VL families: the
student's view (a resolution below the model's own minimum, a random crop, a random blur,
seeded per example) is what vLLM samples from - its log-probs are the student forward's on the
same pixels, its greedy completions HF's - and the teacher's view (a higher resolution, the
region zoomed as an extra image, the box marked) is what vLLM scores for
``teacher.scoring=server``: equal to the transformers teacher forward. The same through the
generation server (one family), where the images travel as PNG.

The engine receives ``Prompt.images``, already at the view's size, and asks vLLM not to resize
them again (``do_resize=False``, as the trainer's processor does); a different size there would
be refused by the engine (a prompt of another length)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from opsd_mm.config import ProcessorConfig, RolloutConfig
from opsd_mm.rollout.hf import HFEngine
from opsd_mm.testing.greedy import greedy_mismatch
from opsd_mm.types import SamplingConfig
from tests.fixtures.vl_examples import STUDENT_VIEW, TEACHER_VIEW, WITH_REGIONS

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("torchvision") is None,
        reason="Qwen-VL processing needs torchvision",
    ),
]

TOL = 1e-4  # nats: fp32 on both sides, two different computations (vLLM's kernels, HF's)
FAMILIES = {"qwen2-vl": "qwen2_vl", "qwen2.5-vl": "qwen2_5_vl", "qwen3-vl": "qwen3_vl"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def views(request, tiny_cache):
    from transformers import AutoModelForImageTextToText

    from opsd_mm.model.tiny import resolve_tiny
    from opsd_mm.processors import build_processor
    from opsd_mm.rollout.vllm_engine import VLLMEngine

    path = str(resolve_tiny(request.param, tiny_cache))
    cfg = ProcessorConfig(student_view=STUDENT_VIEW, teacher_view=TEACHER_VIEW)
    proc = build_processor(cfg, path, FAMILIES[request.param])
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


def test_vllm_scores_the_teachers_view(views, scored_teacher):
    proc, model, engine, prompts, _ = views
    rollouts = engine.generate(prompts, 1, SamplingConfig(1.0, max_new_tokens=10, seed=5))
    pairs = [
        proc.pair(ex, rs[0].completion_ids, student=p)
        for ex, p, rs in zip(WITH_REGIONS, prompts, rollouts)
    ]
    _teacher_scores_match(scored_teacher, proc, model, engine, pairs)


def _teacher_scores_match(scored_teacher, proc, model, engine, pairs) -> None:
    """The engine's teacher scores of ``pairs`` (teacher prompt in the teacher's view, then the
    completion) equal the transformers teacher forward's log-probs within TOL."""
    for s, logp_CV, ids_C in scored_teacher(proc, model, engine, pairs, 0):
        want_C = logp_CV.gather(-1, ids_C[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s.logprobs), want_C, rtol=0, atol=TOL)


def test_the_generation_server_samples_and_scores_the_views(
    views, engine_gap, scored_teacher, tmp_path
):
    """The same through ``opsd-mm serve`` (images as PNG over HTTP): the server samples from
    the student's view and scores the teacher's view as the transformers forwards do."""
    from opsd_mm.rollout.client import ServerEngine
    from opsd_mm.testing.server import ServerProcess

    proc, model, _, prompts, path = views
    if proc.family != "qwen2_5_vl":
        pytest.skip("one family through the server: it runs the same engine as the others")
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
        _teacher_scores_match(scored_teacher, proc, model, engine, pairs)
        engine.release()
    finally:
        srv.stop()
