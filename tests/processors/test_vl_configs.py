"""VL recipes load and validate; the synthetic vl_count task is deterministic and correct."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsd_mm.config import load_config
from opsd_mm.data.vl_tasks import COLOURS, make_vl_count_examples

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# recipe -> (model, processor kind, pixels per visual token side = patch * merge)
RECIPES = {
    "tiny_vl.yaml": ("tiny:qwen2.5-vl", "auto", 28),
    "qwen2.5_vl_7b_mm_math.yaml": ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", 28),
    "qwen3_vl_8b_mm_math.yaml": ("Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl", 32),
    "qwen2.5_vl_7b_wemath.yaml": ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", 28),
    "qwen3_vl_8b_mathvision_style.yaml": ("Qwen/Qwen3-VL-8B-Instruct", "qwen3_vl", 32),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_validates(name):
    cfg = load_config(CONFIGS / name)
    model, kind, factor = RECIPES[name]
    assert cfg.model.name_or_path == model and cfg.processor.kind == kind
    assert cfg.model.lora.enabled and not cfg.model.train_vision_tower
    p = cfg.processor
    assert p.min_pixels % factor**2 == 0 and p.max_pixels % factor**2 == 0
    assert p.min_pixels <= p.max_pixels
    # The largest image must fit the student prompt budget with room for the question.
    assert p.max_pixels // factor**2 < p.max_prompt_tokens < p.max_teacher_prompt_tokens


def test_vl_count_examples():
    a, b = make_vl_count_examples(6, seed=3), make_vl_count_examples(6, seed=3)
    assert [e.id for e in a] == [e.id for e in b] and len({e.id for e in a}) == 6
    for ex, ex2 in zip(a, b):
        assert ex.question == ex2.question and ex.privileged == ex2.privileged
        assert ex.images[0].tobytes() == ex2.images[0].tobytes()
        assert ex.question.startswith("<image>") and len(ex.images) == 1
        assert f"\\boxed{{{ex.answer}}}" in ex.privileged
        # The answer is what the pixels say: sample every cell's centre.
        img, meta = ex.images[0], ex.meta
        cell = img.width // meta["cols"]
        target = COLOURS[meta["colour"]]
        centres = [
            img.getpixel((c * cell + cell // 2, r * cell + cell // 2))
            for r in range(meta["rows"])
            for c in range(meta["cols"])
        ]
        assert sum(px == target for px in centres) == int(ex.answer)
    assert make_vl_count_examples(6, seed=4)[0].privileged != a[0].privileged
