"""The generation server with a tiny Qwen2.5-VL: prompts with images travel over HTTP as PNG
(``opsd_mm.rollout.shared.encode_image``), and the server's greedy completions equal HFEngine's on the
same model, one and two images per prompt, with the server's log-probs equal to the model's.
The client runs in this process (it needs no vLLM); the server in its own."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from opsd_mm.config import ProcessorConfig
from opsd_mm.rollout.client import ServerEngine
from opsd_mm.rollout.hf import HFEngine
from opsd_mm.testing.greedy import greedy_mismatch
from opsd_mm.testing.server import ServerProcess
from opsd_mm.types import Example, SamplingConfig

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("torchvision") is None,
        reason="Qwen-VL processing needs torchvision",
    ),
]

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=16)


@pytest.fixture(scope="module")
def vl_server(tiny_cache, tmp_path_factory):
    """(processor, fp32 HF model, client engine, examples, prompts) for the tiny Qwen2.5-VL."""
    from transformers import AutoModelForImageTextToText

    from opsd_mm.data.vl_tasks import draw_grid, make_vl_count_examples
    from opsd_mm.model.tiny import resolve_tiny
    from opsd_mm.processors import build_processor

    path = str(resolve_tiny("qwen2.5-vl", tiny_cache))
    proc = build_processor(ProcessorConfig(), path, "qwen2_5_vl")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    srv = ServerProcess(path, max_model_len=1024)
    srv.start()
    two = Example(
        id="two-images",
        question="<image 1> and <image 2>: how many red cells in total?",
        privileged="Two in the first grid, one in the second: \\boxed{3}.",
        images=(
            draw_grid({(0, 0): "red", (1, 2): "red"}, 3, 3, 20),
            draw_grid({(2, 1): "red"}, 4, 5, 16),
        ),
    )
    examples = [*make_vl_count_examples(3, seed=1), two]
    prompts = [proc.student_prompt(ex) for ex in examples]
    for ex, p in zip(examples, prompts):
        p.meta["key"] = ex.id
    engine = ServerEngine(
        srv.url,
        tmp_path_factory.mktemp("vl-sync"),
        eos_token_ids=proc.eos_token_ids,
        suppress_token_ids=proc.suppress_token_ids,
    )
    yield proc, model, engine, examples, prompts
    srv.stop()


def _ids(rollouts_P_G):
    return [[r.completion_ids for r in rs] for rs in rollouts_P_G]


def test_vl_server_greedy_matches_hf(vl_server, engine_gap):
    """After a sync of the trainer's (transformers') weights, which the server checks against
    its checkpoint under vLLM's names (``model.language_model.*`` here, ``model.*`` on disk)."""
    proc, model, engine, examples, prompts = vl_server
    engine.sync_weights(model, version=1)
    assert max(len(p.images) for p in prompts) == 2
    served = engine.generate(prompts, 1, GREEDY)
    want = HFEngine.for_processor(model, proc).generate(prompts, 1, GREEDY)
    assert greedy_mismatch(model, prompts, served, want) is None
    assert all(len(r.completion_ids) for rs in served for r in rs)
    # The server's log-probs are the model's own on the images it was sent.
    assert engine_gap(proc, model, examples, prompts, served) < 1e-4


def test_vl_server_answers_a_bad_image_with_400(vl_server):
    """An image that is base64 but not an image, or not base64 at all: 400 naming the prompt
    and the image (it was a 500 with a traceback in the server's log), and the server serves
    on."""
    from opsd_mm.rollout.client import ServerError
    from opsd_mm.rollout.shared import encode_image

    proc, model, engine, examples, prompts = vl_server
    good = encode_image(prompts[0].images[0])
    for bad, why in (("aGVsbG8=", "not a readable image"), ("%%%", "not base64")):
        body = {
            "prompts": [
                {"input_ids": list(prompts[0].input_ids), "key": "a", "images": [good, bad]}
            ],
            "n": 1,
            "sampling": {"temperature": 0.0, "max_new_tokens": 4},
            "eos_token_ids": list(proc.eos_token_ids),
        }
        with pytest.raises(ServerError, match=rf"HTTP 400: prompts\[0\]\.images\[1\]: {why}"):
            engine._call("POST", "/generate", body)
    assert engine.generate(prompts[:1], 1, GREEDY)[0][0].completion_ids
