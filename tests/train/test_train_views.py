"""Training with per-role image views on the tiny Qwen2.5-VL: the pixels a rollout was sampled
from are the pixels the student forward sees, random student views follow (run seed, step,
example), the view gain is logged when due and equals a naive computation, and VA-OPD's
weighting changes the loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from opsd_mm.cli import build_trainer
from opsd_mm.config import load_config
from opsd_mm.loss.view_gain import teacher_view_logprobs
from opsd_mm.types import Pair, view_seed

TINY_VL = Path(__file__).resolve().parents[2] / "configs" / "tiny_vl.yaml"
TEACHER = "processor.teacher_view=[{op: resolution, max_pixels: 40000}, {op: zoom, placement: extra}, {op: mark}]"
STUDENT = "processor.student_view=[{op: resolution, max_pixels: 3200}, {op: random_crop, scale: 0.7}, {op: jpeg, quality: 20, p: 0.5}]"


def trainer_for(tmp_path, tiny_cache, *extra):
    cfg = load_config(
        TINY_VL,
        [
            f"run_dir={tmp_path}",
            f"model.tiny_cache_dir={tiny_cache}",
            "logging.progress=false",
            "trainer.save_every=0",
            "trainer.max_steps=3",
            "rollout.max_new_tokens=8",
            TEACHER,
            STUDENT,
            *extra,
        ],
    )
    return build_trainer(cfg)


def test_rollout_pixels_are_the_student_forward_pixels(tmp_path, tiny_cache):
    trainer = trainer_for(tmp_path, tiny_cache, "logging.view_gain_every=1")
    sampled: dict[int, torch.Tensor] = {}
    generate, collate = trainer.engine.generate, trainer.processor.collate
    forwards = []

    def spy_generate(prompts, n, sampling):
        for p in prompts:
            sampled[id(p)] = p.mm_inputs["pixel_values"].clone()
            # What a vLLM engine receives (Prompt.images) encodes to the same pixels.
            hf = trainer.processor.hf(
                text=[p.text], images=p.images, return_tensors="pt", do_resize=False
            )
            assert torch.equal(hf["pixel_values"], p.mm_inputs["pixel_values"])
        return generate(prompts, n, sampling)

    def spy_collate(pairs):
        batch = collate(pairs)
        if all(id(p.student) in sampled for p in pairs):  # a loss micro-batch
            want = torch.cat([sampled[id(p.student)] for p in pairs])
            forwards.append(torch.equal(batch.student.model_inputs["pixel_values"], want))
        return batch

    trainer.engine.generate = spy_generate
    trainer.processor.collate = spy_collate
    metrics = trainer.train_step()
    assert forwards and all(forwards) and math.isfinite(metrics["loss"])
    # The student's view differs from the teacher's: fewer image tokens.
    pair = trainer._last_step[1][0]
    assert pair.student.meta["image_tokens"] < pair.teacher.meta["image_tokens"]
    assert pair.student.meta["view_seed"] == view_seed(0, 1, pair.example_id)


def test_random_student_view_follows_seed_step_and_example(tmp_path, tiny_cache):
    a = trainer_for(tmp_path / "a", tiny_cache)
    b = trainer_for(tmp_path / "b", tiny_cache)
    batch_a, batch_b = a._draw(1), b._draw(1)
    for pa, pb in zip(batch_a.prompts, batch_b.prompts):  # another run, the same pixels
        assert torch.equal(pa.mm_inputs["pixel_values"], pb.mm_inputs["pixel_values"])
    ex = batch_a.examples[0]
    step1 = a._student_renderer(1)(ex)
    assert torch.equal(
        step1.mm_inputs["pixel_values"], batch_a.prompts[0].mm_inputs["pixel_values"]
    )
    others = [a._student_renderer(s)(ex).mm_inputs["pixel_values"] for s in range(2, 8)]
    assert any(
        o.shape != step1.mm_inputs["pixel_values"].shape
        or not torch.equal(o, step1.mm_inputs["pixel_values"])
        for o in others
    )
    m_a, m_b = a.train_step(), b.train_step()
    assert m_a["loss"] == m_b["loss"]


def test_view_gain_logged_when_due_and_equal_to_a_naive_computation(tmp_path, tiny_cache):
    trainer = trainer_for(tmp_path, tiny_cache, "logging.view_gain_every=2")
    rows = [trainer.train_step() for _ in range(2)]
    assert "view_gain/mean" not in rows[0]
    assert {"view_gain/mean", "view_gain/positive_share"} <= rows[1].keys()
    assert "view_gain/high_share" not in rows[1]  # no VA-OPD weighting
    # The logged mean against log-softmax of materialised logits, pair by pair.
    examples, pairs, _ = trainer._last_step
    by_id = {ex.id: ex for ex in examples}
    model, proc = trainer.model, trainer.processor
    gains = []
    for pair in pairs:
        seed = pair.student.meta["view_seed"]
        counter = proc.gain_prompt(by_id[pair.example_id], seed=seed)
        batch = proc.collate([Pair(pair.example_id, counter, pair.teacher, pair.completion_ids)])
        mask = batch.completion_mask_BC.bool()
        ids = batch.completion_ids_BC[mask]
        lp = []
        with torch.no_grad(), trainer.teacher.as_teacher(model) as teacher_model:
            for side in (batch.teacher, batch.student):
                logits = teacher_model(**side.model_inputs, use_cache=False).logits
                cols = logits[:, side.prompt_width - 1 : -1][mask]
                lp.append(cols.float().log_softmax(-1).gather(-1, ids[:, None])[:, 0])
        fast = teacher_view_logprobs(batch, model, trainer.teacher, mask)
        assert torch.allclose(fast[0], lp[0], atol=1e-4) and torch.allclose(
            fast[1], lp[1], atol=1e-4
        )
        gains.append(lp[0] - lp[1])
    g = torch.cat(gains)
    # The step's completions were sampled before its update, the check runs after it: the
    # fixed teacher (the LoRA base) did not change, so the gains are the step's.
    assert rows[1]["view_gain/mean"] == pytest.approx(g.mean().item(), abs=1e-4)
    assert rows[1]["view_gain/positive_share"] == pytest.approx((g > 0).float().mean().item())


def test_va_opd_weighting_changes_the_loss(tmp_path, tiny_cache):
    plain = trainer_for(tmp_path / "plain", tiny_cache).train_step()
    va = trainer_for(tmp_path / "va", tiny_cache, "loss.view_weighting=va_opd").train_step()
    assert math.isfinite(va["loss"]) and va["loss"] != plain["loss"]
    assert va["completion_len_mean"] == plain["completion_len_mean"]  # the same rollouts
    for key in ("view_gain/mean", "view_gain/high_share", "view_gain/rollout_weight_max"):
        assert key in va
    assert "view_gain/mean" not in plain
