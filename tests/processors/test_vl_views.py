"""Per-role image views on the three tiny Qwen-VL families: each role's own image-token count with
the completion at the same columns on both sides, M-RoPE positions against a per-side reference,
the padded batch equal to each row alone, the student's view reproducible from its seed and
rendered identically in the teacher's context, the vision-once cache keyed by what each view
shows, and bad regions skipped or raised by policy. (Operations alone: test_views.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opsd_mm.config import ProcessorConfig
from opsd_mm.config.sections import ViewOpConfig
from opsd_mm.model.forward import completion_logits
from opsd_mm.model.packing import mrope_positions
from opsd_mm.processors.images import BadImageError
from opsd_mm.processors.vision_cache import VisionCache, find_vision_tower
from opsd_mm.processors.vl import QwenVLProcessor
from opsd_mm.types import Pair, Region
from tests.fixtures.vl_examples import EXAMPLES, FROZEN, STUDENT_VIEW, TEACHER_VIEW, WITH_REGIONS
from tests.fixtures.vl_examples import random_completion as completion

TEACHER, STUDENT = TEACHER_VIEW, STUDENT_VIEW


def with_views(proc: QwenVLProcessor, student=STUDENT, teacher=TEACHER, **cfg) -> QwenVLProcessor:
    config = dataclasses.replace(proc.cfg, student_view=student, teacher_view=teacher, **cfg)
    return QwenVLProcessor(proc.hf, config, proc.family, reuse_vision=True)


def reference_mrope(ids: list[int], grids: list[list[int]], image_id: int) -> torch.Tensor:
    """M-RoPE positions [3, n] of one unpadded row, written from Qwen2-VL's rule: a text token
    takes the next position on all three axes; an image of merged grid (t, h, w) takes
    (start + i_t, start + i_h, start + i_w) over its tokens, and the text after it starts at
    start + max(t, h, w)."""
    pos: list[tuple[int, int, int]] = []
    start, i, grid = 0, 0, iter(grids)
    while i < len(ids):
        if ids[i] != image_id:
            pos.append((start, start, start))
            start, i = start + 1, i + 1
            continue
        t, h, w = next(grid)
        h, w = h // 2, w // 2
        pos += [
            (start + a, start + b, start + c) for a in range(t) for b in range(h) for c in range(w)
        ]
        i += t * h * w
        start += max(t, h, w)
    return torch.tensor(pos).T


def test_each_role_its_own_image_tokens_with_the_completion_aligned(proc, model):
    """Teacher and student see different numbers of images and image tokens; the completion
    sits at P .. P+C-1 on both sides, and every row's M-RoPE positions are those of the
    per-side reference, and its completion logits those it gets alone."""
    p = with_views(proc)
    lengths = (5, 9, 6)
    pairs = []
    for k, (ex, n) in enumerate(zip(WITH_REGIONS, lengths)):
        student = p.student_prompt(ex, seed=100 + k)
        pairs.append(p.pair(ex, completion(p, n, n), student=student))
    counts = [(pr.student.meta["image_tokens"], pr.teacher.meta["image_tokens"]) for pr in pairs]
    assert all(s < t for s, t in counts), counts  # the teacher sees more, every row
    assert len(pairs[1].teacher.images) == 2 + 2 + 1  # two images, two zooms, one teacher-only
    assert len(pairs[1].student.images) == 2 and len(pairs[2].teacher.images) == 1  # no region
    batch = p.collate(pairs)
    C = batch.completion_ids_BC.shape[1]
    for side_name in ("student", "teacher"):
        side = getattr(batch, side_name)
        P, inputs = side.prompt_width, side.model_inputs
        ids_C = inputs["input_ids"][:, P:] * batch.completion_mask_BC
        assert torch.equal(ids_C, batch.completion_ids_BC * batch.completion_mask_BC)
        assert torch.equal(inputs["attention_mask"][:, P:], batch.completion_mask_BC)
        assert not inputs["mm_token_type_ids"][:, P:].any()
        positions_3BT = mrope_positions(model, inputs)
        grids = inputs["image_grid_thw"].tolist()
        for b, pair in enumerate(pairs):
            prompt = getattr(pair, side_name)
            start = P - len(prompt.input_ids)
            n_img = len(prompt.images)
            row_grids, grids = grids[:n_img], grids[n_img:]
            row = prompt.input_ids + pair.completion_ids
            ref_3n = reference_mrope(row, row_grids, p.image_token_id)
            got_3n = positions_3BT[:, b, start : P + len(pair.completion_ids)]
            assert torch.equal(got_3n, ref_3n), (side_name, pair.example_id)
        with torch.no_grad():
            got_BCV = completion_logits(model, side, C)
            for b, pair in enumerate(pairs):
                alone = getattr(p.collate([pair]), side_name)
                ref_CV = completion_logits(model, alone, lengths[b])[0]
                diff = (got_BCV[b, : lengths[b]] - ref_CV).abs().max().item()
                assert diff < 1e-4, (side_name, pair.example_id, diff)


def test_student_view_follows_its_seed(proc):
    p = with_views(proc)
    ex = WITH_REGIONS[1]
    a, b = p.student_prompt(ex, seed=7), p.student_prompt(ex, seed=7)
    assert torch.equal(a.mm_inputs["pixel_values"], b.mm_inputs["pixel_values"])
    assert a.input_ids == b.input_ids and a.meta["view_seed"] == 7
    others = [p.student_prompt(ex, seed=s).mm_inputs["pixel_values"] for s in range(8, 14)]
    assert any(
        o.shape != a.mm_inputs["pixel_values"].shape
        or not torch.equal(o, a.mm_inputs["pixel_values"])
        for o in others
    )
    # Without a seed (evaluation) the random crop and blur are left out: only the resolution.
    plain = with_views(proc, student=STUDENT[:1]).student_prompt(ex)
    unseeded = p.student_prompt(ex)
    assert torch.equal(unseeded.mm_inputs["pixel_values"], plain.mm_inputs["pixel_values"])
    assert "view_seed" not in unseeded.meta


def test_teacher_context_in_the_student_view_has_the_students_pixels(proc):
    p = with_views(proc)
    for k, ex in enumerate(WITH_REGIONS):
        student = p.student_prompt(ex, seed=k)
        counter = p.gain_prompt(ex, seed=k)
        teacher = p.teacher_prompt(ex)
        n = int(student.mm_inputs["image_grid_thw"].prod(-1).sum())
        assert torch.equal(counter.mm_inputs["pixel_values"][:n], student.mm_inputs["pixel_values"])
        # The rest of the teacher's context is its own: template, privileged text, teacher-only
        # images (resized as the teacher's are).
        assert (
            counter.meta["template"] == teacher.meta["template"]
            and counter.meta["view"] == "student"
        )
        assert (ex.privileged in counter.text) and ex.privileged not in student.text
        n_t = len(ex.teacher_images)
        if n_t:
            assert torch.equal(
                counter.mm_inputs["image_grid_thw"][-n_t:],
                teacher.mm_inputs["image_grid_thw"][-n_t:],
            )


def test_gain_view_replaces_the_student_view_in_the_gain_prompt(proc):
    """processor.gain_view (VA-OPD's pixelated counterfactual): the gain prompt shows the
    question images in that view, whatever the student sees."""
    pixelated = [ViewOpConfig("downscale", factor=0.1)]
    p = with_views(proc, student=[], teacher=[], gain_view=pixelated)
    ex = WITH_REGIONS[1]
    gain = p.gain_prompt(ex, seed=5)
    as_student = with_views(proc, student=pixelated, teacher=[]).student_prompt(ex)
    n = int(as_student.mm_inputs["image_grid_thw"].prod(-1).sum())
    assert torch.equal(gain.mm_inputs["pixel_values"][:n], as_student.mm_inputs["pixel_values"])
    assert not torch.equal(
        gain.mm_inputs["pixel_values"][:n], p.student_prompt(ex).mm_inputs["pixel_values"]
    )
    assert gain.meta["view"] == "gain" and ex.privileged in gain.text


def test_vision_cache_keys_each_image_by_its_view(proc, model):
    """Each distinct (image, view) is encoded once per step: the two roles' views of an image
    are two encodings; the teacher context in the student's view (the view gain's third
    forward) reuses the student's encodings; an image both roles see the same is encoded once."""
    visual = find_vision_tower(model)
    visual.requires_grad_(False)
    p = with_views(proc)
    ex = WITH_REGIONS[1]  # 2 images, 2 zoom cuts and one teacher-only image for the teacher
    student = p.student_prompt(ex, seed=3)
    pairs = [p.pair(ex, completion(p, 4 + i, i), student=student) for i in range(2)]  # n = 2
    counter = p.gain_prompt(ex, seed=3)
    gain_pairs = [Pair(q.example_id, counter, q.teacher, q.completion_ids) for q in pairs]
    with VisionCache(model) as cache, torch.no_grad():
        model(**p.collate(pairs).teacher.model_inputs, use_cache=False)
        assert cache.stats["images_encoded"] == 5  # 2 viewed + 2 cuts + 1 teacher-only, once
        model(**p.collate(gain_pairs).student.model_inputs, use_cache=False)
        assert cache.stats["images_encoded"] == 5 + 2  # the student's two views, first seen
        model(**p.collate(pairs).student.model_inputs, use_cache=False)
        assert cache.stats["images_encoded"] == 7  # the student forward: all hits
        assert cache.stats["images_requested"] == 2 * 5 + 2 * 3 + 2 * 2
    # A teacher view that shows the question images as the student does (no resolution, only
    # extra cuts): the shared originals are encoded once for both roles.
    same = with_views(proc, student=[], teacher=[ViewOpConfig("zoom", placement="extra")])
    pair = same.pair(ex, completion(same, 5, 1))
    batch = same.collate([pair])
    with VisionCache(model) as cache, torch.no_grad():
        model(**batch.teacher.model_inputs, use_cache=False)
        model(**batch.student.model_inputs, use_cache=False)
    assert cache.stats["images_encoded"] == 2 + 2 + 1  # originals, cuts, teacher-only


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_bad_regions_follow_the_bad_image_policy(proc, policy):
    p = with_views(proc, bad_image_policy=policy)
    outside = dataclasses.replace(FROZEN, id="outside", regions=(Region(0, (0, 0, 61, 10)),))
    empty = dataclasses.replace(
        FROZEN, id="empty", regions=(Region(1, (0.5, 0.2, 0.5, 0.9), True),)
    )
    missing = dataclasses.replace(FROZEN, id="no-image", regions=(Region(2, (0, 0, 5, 5)),))
    good = WITH_REGIONS[1]
    if policy == "raise":
        with pytest.raises(
            BadImageError, match="outside.*region 1 \\(image 1\\).*outside the image"
        ):
            p.prepare_examples([good, outside])
        return
    kept = p.prepare_examples([good, outside, empty, missing, EXAMPLES[2]])
    assert [ex.id for ex in kept] == [good.id, EXAMPLES[2].id]
    assert [(e.example_id, e.reason.split(" ")[0]) for e in p.bad_images] == [
        ("outside", "box"),
        ("empty", "empty"),
        ("no-image", "the"),
    ]
    assert p.missing_regions == 1  # "tall" has none: its images pass unchanged
    # Views that read no region never check them.
    plain = with_views(proc, student=[], teacher=[ViewOpConfig("blur")], bad_image_policy=policy)
    assert len(plain.prepare_examples([outside, empty])) == 2


def test_no_views_no_change(proc):
    """Empty views render exactly what the processor rendered before views existed (the prompt
    snapshots hold the text; here the pixels)."""
    p = with_views(proc, student=[], teacher=[])
    for ex in WITH_REGIONS:
        for side in ("student", "teacher"):
            a = getattr(p, f"{side}_prompt")(ex)
            b = getattr(QwenVLProcessor(proc.hf, ProcessorConfig(), proc.family), f"{side}_prompt")(
                ex
            )
            assert a.input_ids == b.input_ids
            assert torch.equal(a.mm_inputs["pixel_values"], b.mm_inputs["pixel_values"])
