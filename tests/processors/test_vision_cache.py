"""VisionCache on the three tiny Qwen-VL families: each distinct image encoded once per step,
identical logits and gradients, off when the tower trains, exact under fingerprint collisions."""

from __future__ import annotations

import pytest
import torch

from opsd_mm.config import LoraConfig
from opsd_mm.model.forward import completion_logits
from opsd_mm.processors.vision_cache import VisionCache, find_vision_tower
from opsd_mm.processors.vl import QwenVLProcessor
from tests.fixtures.vl_examples import EXAMPLES, FROZEN
from tests.fixtures.vl_examples import random_completion as completion


def step(model, batch, reuse: bool):
    """One OPSD-like step: teacher forward (no grad) then student forward and backward of a
    simple divergence. Returns (teacher logits, student logits, grads, patch rows encoded)."""
    visual = find_vision_tower(model)
    rows: list[int] = []
    handle = visual.patch_embed.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    model.zero_grad(set_to_none=True)
    C = batch.completion_ids_BC.shape[1]
    mask = batch.completion_mask_BC.bool()
    try:
        with VisionCache(model, enabled=reuse) as cache:
            assert cache.active is reuse
            with torch.no_grad():
                t_logits = completion_logits(model, batch.teacher, C)
            s_logits = completion_logits(model, batch.student, C)
        loss = torch.nn.functional.kl_div(
            s_logits[mask].log_softmax(-1),
            t_logits[mask].log_softmax(-1),
            log_target=True,
            reduction="batchmean",
        )
        loss.backward()
    finally:
        handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return t_logits, s_logits.detach(), grads, sum(rows)


def test_vision_encoded_once_per_step(proc, model):
    visual = find_vision_tower(model)
    for p in model.parameters():
        p.requires_grad_(True)
    for p in visual.parameters():
        p.requires_grad_(False)
    # Two samples of the same example (rollout.n = 2) plus two other examples.
    exs = (EXAMPLES[0], FROZEN, FROZEN, EXAMPLES[2])
    pairs = [proc.pair(ex, completion(proc, 5 + i, i)) for i, ex in enumerate(exs)]
    batch = proc.collate(pairs)
    # Distinct images: one per example, FROZEN's two shared and one teacher-only.
    unique = {}
    for p in pairs:
        pix, grid = p.teacher.mm_inputs["pixel_values"], p.teacher.mm_inputs["image_grid_thw"]
        for rows_i in pix.split(grid.prod(-1).tolist()):
            unique[rows_i.numpy().tobytes()] = rows_i.shape[0]
    n_teacher = batch.teacher.model_inputs["pixel_values"].shape[0]
    n_student = batch.student.model_inputs["pixel_values"].shape[0]

    t0, s0, g0, rows_plain = step(model, batch, reuse=False)
    t1, s1, g1, rows_reuse = step(model, batch, reuse=True)
    assert rows_plain == n_teacher + n_student
    assert rows_reuse == sum(unique.values()) < n_teacher  # each distinct image once
    assert (t1 - t0).abs().max() < 1e-5 and (s1 - s0).abs().max() < 1e-5
    assert g0.keys() == g1.keys() and not any("visual" in n for n in g0)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-4, atol=1e-7), name
    assert "forward" not in visual.__dict__  # the tower is restored after the step


def test_vision_reuse_off_when_tower_trains(proc, model):
    visual = find_vision_tower(model)
    batch = proc.collate([proc.pair(FROZEN, completion(proc, 4, 0))])
    visual.requires_grad_(False)
    next(visual.merger.parameters()).requires_grad_(True)  # e.g. model.train_projector
    with VisionCache(model) as cache:
        assert not cache.active
    visual.requires_grad_(False)
    with proc.step_context(model) as cache:
        assert isinstance(cache, VisionCache) and cache.active
        with torch.no_grad():
            model(**batch.teacher.model_inputs, use_cache=False)
            model(**batch.student.model_inputs, use_cache=False)
        assert cache.stats["images_encoded"] == 3 and cache.stats["images_requested"] == 5
    off = QwenVLProcessor(proc.hf, proc.cfg, proc.family, reuse_vision=False)
    with off.step_context(model) as ctx:
        assert ctx is None


def test_lora_regex_spares_vision_and_cache_sees_through_peft(family, proc):
    """The default LoRA target regex wraps every language-model projection and nothing in the
    vision tower; the cache finds the tower through the peft wrapper."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(family[2], dtype=torch.float32)
    n_layers = base.config.text_config.num_hidden_layers
    regex = LoraConfig().target_regex
    model = get_peft_model(base, PeftLora(r=2, lora_alpha=4, target_modules=regex))
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert len(wrapped) == 7 * n_layers and not any("visual" in n for n in wrapped)
    assert all(".language_model." in n for n in wrapped)
    assert find_vision_tower(model) is base.model.visual
    with VisionCache(model) as cache:
        assert cache.active  # LoRA params require grad, but none lives in the tower


def test_reuse_is_exact_even_when_fingerprints_collide(proc, model, monkeypatch):
    """Fingerprints only pick candidates; torch.equal on the pixels decides, so a collision
    cannot mix up images."""
    batch = proc.collate([proc.pair(ex, completion(proc, 4, 1)) for ex in EXAMPLES])
    find_vision_tower(model).requires_grad_(False)
    with torch.no_grad():
        ref = model(**batch.student.model_inputs, use_cache=False).logits
        monkeypatch.setattr(
            VisionCache, "_fingerprints", lambda self, x, sizes: [(0, 0)] * len(sizes)
        )
        with VisionCache(model) as cache:
            model(**batch.teacher.model_inputs, use_cache=False)
            got = model(**batch.student.model_inputs, use_cache=False).logits
    assert cache.stats["images_encoded"] == 5  # 4 distinct images + the teacher-only one
    # The reused encodings come from the teacher's forward over its own 5 images, another
    # computation than the student's over 4 (as in test_vision_encoded_once_per_step): equal
    # up to rounding. An image mixed up by a collision would be off by far more.
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fingerprint_independent_of_batch(dtype):
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(n, 1176, generator=g).to(dtype) for n in (16, 24, 16))
    cache = VisionCache(torch.nn.Linear(1, 1))
    fp_ab = cache._fingerprints(torch.cat([a, b]), [16, 24])
    fp_cba = cache._fingerprints(torch.cat([c, b, a]), [16, 24, 16])
    assert fp_ab[0] == fp_cba[2] and fp_ab[1] == fp_cba[1] and fp_ab[0] != fp_cba[0]
