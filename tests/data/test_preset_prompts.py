"""Prompt snapshots of preset data on the tiny Qwen2.5-VL: MathVision's options reach the student
(and the teacher) in the official format, and each preset's teacher template reaches the
teacher. Rerun with OPSD_UPDATE_SNAPSHOTS=1 after an intended change."""

import os
from pathlib import Path

import pytest

from opsd_mm.config import load_config
from opsd_mm.data.load import rows_to_examples
from opsd_mm.data.presets import get_preset, resolve_data
from tests.fixtures.schemas import rows_for

SNAPSHOTS = Path(__file__).resolve().parents[1] / "snapshots"
CASES = [  # (preset, row index, side)
    ("mathvision", 1, "student"),
    ("mathvision", 1, "teacher"),
    ("virl39k", 0, "teacher"),
    ("wemath2_standard", 0, "teacher"),
    ("wemath2_sft", 0, "teacher"),
]


@pytest.fixture(scope="module")
def tiny_vl(tiny_cache):
    from opsd_mm.model.tiny import resolve_tiny

    return str(resolve_tiny("qwen2.5-vl", tiny_cache))


def render(preset: str, index: int, side: str, model_dir: str) -> str:
    from opsd_mm.processors import build_processor

    cfg = resolve_data(load_config(None, [f"data.preset={preset}"]))
    examples, _ = rows_to_examples(rows_for(preset), get_preset(preset), require_privileged=False)
    proc = build_processor(cfg.processor, model_dir, "qwen2_5_vl")
    prompt = getattr(proc, f"{side}_prompt")(examples[index])
    grid = prompt.mm_inputs["image_grid_thw"].tolist()
    images = [
        f"image {i + 1}: grid {g} -> {g[0] * g[1] * g[2] // 4} tokens" for i, g in enumerate(grid)
    ]
    return f"template: {prompt.meta['template']}\n{prompt.text}\n---- images ----\n" + "\n".join(
        images
    )


@pytest.mark.parametrize(("preset", "index", "side"), CASES)
def test_preset_prompt_snapshot(preset, index, side, tiny_vl):
    text = render(preset, index, side, tiny_vl) + "\n"
    path = SNAPSHOTS / f"data_{preset}_{side}.txt"
    if os.environ.get("OPSD_UPDATE_SNAPSHOTS") == "1":
        path.write_bytes(text.encode("utf-8"))
    assert path.exists(), f"missing snapshot {path}; run with OPSD_UPDATE_SNAPSHOTS=1"
    assert text == path.read_bytes().decode("utf-8"), f"{preset} {side} prompt drifted from {path}"


def test_mathvision_options_reach_both_sides(tiny_vl):
    block = "(A) 24\n(B) 25\n(C) 26\n(D) 27\n(E) 0"
    for side in ("student", "teacher"):
        assert block in render("mathvision", 1, side, tiny_vl)
    teacher = {p: render(p, 0, "teacher", tiny_vl) for p in ("virl39k", "wemath2_standard")}
    assert "The correct final answer to this problem is: 12" in teacher["virl39k"]
    assert (
        "Hint: The area of a rectangle is its width times its height."
        in teacher["wemath2_standard"]
    )
