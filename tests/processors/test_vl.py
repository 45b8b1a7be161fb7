"""QwenVLProcessor on the three tiny Qwen-VL families: prompt snapshots, image-token counts, pair
alignment, padding invariance of a mixed-image batch, teacher-only images, bad images. (The
vision-once cache: test_vision_cache.py; shared fixtures: conftest.py.)"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image

from opsd_mm.config import ProcessorConfig
from opsd_mm.model.forward import completion_logits
from opsd_mm.processors.vl import QwenVLProcessor
from opsd_mm.types import Example
from tests.fixtures.vl_examples import EXAMPLES, FROZEN
from tests.fixtures.vl_examples import random_completion as completion

SNAPSHOTS = Path(__file__).resolve().parents[1] / "snapshots"


def with_cfg(proc: QwenVLProcessor, **changes) -> QwenVLProcessor:
    return QwenVLProcessor(
        proc.hf, dataclasses.replace(proc.cfg, **changes), proc.family, reuse_vision=True
    )


# ----------------------------------------------------------------------------- fixture


def test_tiny_model_reloads_offline(family, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    name, kind, path = family
    hf = AutoProcessor.from_pretrained(path)
    m = AutoModelForImageTextToText.from_pretrained(path)
    assert m.config.model_type == kind
    text, vision = m.config.text_config, m.config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert head_dim == 32 and sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert getattr(vision, "out_hidden_size", vision.hidden_size) == text.hidden_size
    assert hf.image_processor.patch_size == (16 if kind == "qwen3_vl" else 14)
    for key in ("image_token_id", "video_token_id", "vision_start_token_id"):
        assert getattr(m.config, key) < text.vocab_size


# ----------------------------------------------------------------------------- prompts


def snapshot_text(proc: QwenVLProcessor, side: str) -> str:
    """The rendered prompt, then one line per image: resized size, grid and token count."""
    prompt = getattr(proc, f"{side}_prompt")(FROZEN)
    grid = prompt.mm_inputs["image_grid_thw"].tolist()
    lines = [
        f"image {i + 1}: {im.width}x{im.height} -> grid {g} -> {g[0] * g[1] * g[2] // 4} tokens"
        for i, (im, g) in enumerate(zip(prompt.images, grid))
    ]
    return prompt.text + "\n---- images ----\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_prompt_snapshot(proc, family, side):
    text = snapshot_text(proc, side)
    path = SNAPSHOTS / f"vl_{family[0]}_{side}.txt"
    if os.environ.get("OPSD_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    assert path.exists(), f"missing snapshot {path}; run with OPSD_UPDATE_SNAPSHOTS=1"
    assert text == path.read_bytes().decode("utf-8"), (
        f"{side} prompt drifted from {path}; if intended, publish a new template name or "
        "rerun with OPSD_UPDATE_SNAPSHOTS=1"
    )


def test_image_tokens_match_features(proc):
    for ex in EXAMPLES:
        for side in ("student", "teacher"):
            prompt = getattr(proc, f"{side}_prompt")(ex)
            grid = prompt.mm_inputs["image_grid_thw"]
            n_feat = int((grid.prod(-1) // proc.merge_size**2).sum())
            assert prompt.input_ids.count(proc.image_token_id) == n_feat > 0
            assert prompt.input_ids.count(proc.vision_start_id) == len(prompt.images) == len(grid)
            assert prompt.mm_inputs["pixel_values"].shape[0] == int(grid.prod(-1).sum())
            types = torch.tensor(prompt.token_type_ids)
            ids = torch.tensor(prompt.input_ids)
            assert torch.equal(types == 1, ids == proc.image_token_id)
            for im, g in zip(prompt.images, grid.tolist()):  # the engine gets what was encoded
                assert (im.height, im.width) == (g[1] * proc.patch_size, g[2] * proc.patch_size)


def test_mismatch_names_example(proc):
    prompt = proc.student_prompt(FROZEN)
    prompt.mm_inputs["image_grid_thw"] = prompt.mm_inputs["image_grid_thw"][:1]
    with pytest.raises(ValueError, match="vl-frozen-0.*student.*image tokens"):
        proc.check_image_tokens(prompt, FROZEN.id, "student")
    pair = proc.pair(FROZEN, completion(proc, 3, 0), student=prompt)
    with pytest.raises(ValueError, match="vl-frozen-0"):
        proc.collate([pair])


def test_ids_from_one_template_application(proc, monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("prompt rendering must not decode ids")

    monkeypatch.setattr(proc.tokenizer, "decode", no_decode)
    monkeypatch.setattr(proc.tokenizer, "batch_decode", no_decode)
    for ex in EXAMPLES:
        for prompt in (proc.student_prompt(ex), proc.teacher_prompt(ex)):
            # Expanding each <|image_pad|> to its feature count and tokenising gives the ids.
            counts = (prompt.mm_inputs["image_grid_thw"].prod(-1) // 4).tolist()
            pieces = prompt.text.split("<|image_pad|>")
            expanded = pieces[0] + "".join(
                "<|image_pad|>" * n + rest for n, rest in zip(counts, pieces[1:])
            )
            assert (
                prompt.input_ids == proc.tokenizer(expanded, add_special_tokens=False)["input_ids"]
            )


def test_image_placement(proc):
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    prompt = proc.student_prompt(FROZEN)
    assert f"Problem: {pad} is the left grid and {pad} the right one." in prompt.text
    # <image 2> before <image 1>: images follow the placeholders, not the list order.
    swapped = dataclasses.replace(FROZEN, question="Right <image 2>, left <image1>.")
    p2 = proc.student_prompt(swapped)
    assert [im.size for im in p2.images] == [im.size for im in reversed(prompt.images)]
    # No placeholder: images before the question text.
    p3 = proc.student_prompt(EXAMPLES[2])
    assert f"Problem: {pad}Count the rows." in p3.text
    with pytest.raises(ValueError, match="vl-frozen-0.*<image 3>"):
        proc.student_prompt(dataclasses.replace(FROZEN, question="<image 3>?"))
    with pytest.raises(ValueError, match="one.*more <image> placeholders"):
        proc.student_prompt(dataclasses.replace(EXAMPLES[0], question="<image> <image>"))


def test_teacher_only_images(proc):
    student, teacher = proc.student_prompt(FROZEN), proc.teacher_prompt(FROZEN)
    assert len(student.images) == 2 and len(teacher.images) == 3
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    assert student.text.count(pad) == 2 and "Reference" not in student.text
    # The teacher-only image sits right before the privileged text.
    assert f"=== Reference Solution Begin ===\n{pad}{FROZEN.privileged}" in teacher.text
    # Shared images are the same pixels on both sides (what vision reuse relies on).
    n_shared = int(student.mm_inputs["image_grid_thw"].prod(-1).sum())
    assert torch.equal(
        teacher.mm_inputs["pixel_values"][:n_shared], student.mm_inputs["pixel_values"]
    )
    assert teacher.mm_inputs["pixel_values"].shape[0] > n_shared
    # A template without {privileged}: teacher images follow the question.
    answer_only = with_cfg(proc, teacher_template="answer_only_v1").teacher_prompt(FROZEN)
    assert f"How many red cells in total?{pad}\n\nThe correct final answer" in answer_only.text
    assert len(answer_only.images) == 3


def test_control_tokens_in_data_rejected(proc):
    bad = dataclasses.replace(FROZEN, question="<image> sneaky <|image_pad|> token")
    with pytest.raises(ValueError, match="vl-frozen-0.*question.*<\\|image_pad\\|>"):
        proc.student_prompt(bad)


def test_privileged_truncation(proc):
    full = proc.teacher_prompt(FROZEN)
    assert full.meta["privileged_truncated"] is False
    limit = len(full.input_ids) - 6
    prompt = with_cfg(proc, max_teacher_prompt_tokens=limit).teacher_prompt(FROZEN)
    assert len(prompt.input_ids) <= limit and prompt.meta["privileged_truncated"] is True
    assert 0 < prompt.meta["privileged_tokens_kept"] < prompt.meta["privileged_tokens"]
    assert prompt.meta["image_tokens"] == full.meta["image_tokens"]  # images are never cut
    with pytest.raises(ValueError, match="vl-frozen-0.*max_prompt_tokens=20"):
        with_cfg(proc, max_prompt_tokens=20).student_prompt(FROZEN)


def test_token_sets(proc):
    tok = proc.tokenizer
    suppressed = set(proc.suppress_token_ids)
    for name in ("<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"):
        assert tok.convert_tokens_to_ids(name) in suppressed, name
    assert tok.convert_tokens_to_ids("<|video_pad|>") in suppressed
    assert not suppressed & set(proc.eos_token_ids)
    assert proc.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")


@pytest.mark.parametrize("name", ["<|image_pad|>", "<|vision_start|>", "<|video_pad|>"])
def test_completion_with_image_tokens_rejected(proc, name):
    bad = completion(proc, 6, 1)
    bad[2] = proc.tokenizer.convert_tokens_to_ids(name)
    with pytest.raises(ValueError, match=f"vl-frozen-0.*image/vision tokens.*{re.escape(name)}"):
        proc.pair(FROZEN, bad)


# ----------------------------------------------------------------------------- pairs


def test_collate_alignment(proc):
    lengths = (3, 9, 5)
    pairs = [proc.pair(ex, completion(proc, n, n)) for ex, n in zip(EXAMPLES, lengths)]
    batch = proc.collate(pairs)
    B, C = len(pairs), max(lengths)
    assert batch.completion_ids_BC.shape == (B, C)
    for side_name in ("student", "teacher"):
        side = getattr(batch, side_name)
        P, inputs = side.prompt_width, side.model_inputs
        assert set(inputs) == {
            "input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"
        }  # fmt: skip
        assert inputs["input_ids"].shape == inputs["mm_token_type_ids"].shape == (B, P + C)
        # Completion at P .. P+C-1 on both sides, identical ids, typed as text.
        ids_C = inputs["input_ids"][:, P:] * batch.completion_mask_BC
        assert torch.equal(ids_C, batch.completion_ids_BC * batch.completion_mask_BC)
        assert torch.equal(inputs["attention_mask"][:, P:], batch.completion_mask_BC)
        assert not inputs["mm_token_type_ids"][:, P:].any()
        prompts = [getattr(p, side_name) for p in pairs]
        assert torch.equal(
            inputs["image_grid_thw"], torch.cat([p.mm_inputs["image_grid_thw"] for p in prompts])
        )
        n_feat = int((inputs["image_grid_thw"].prod(-1) // 4).sum())
        assert int((inputs["input_ids"] == proc.image_token_id).sum()) == n_feat
        for i, prompt in enumerate(prompts):
            start = P - len(prompt.input_ids)
            assert inputs["input_ids"][i, start:P].tolist() == prompt.input_ids
            assert inputs["mm_token_type_ids"][i, start:P].tolist() == prompt.token_type_ids
            assert inputs["attention_mask"][i, :start].sum() == 0


def test_padding_invariance(proc, model):
    """A padded batch with different image counts and sizes gives each pair's completion logits
    as if it ran alone (M-RoPE computed per row from its own tokens, grids and mask)."""
    lengths = (4, 11, 7)
    pairs = [proc.pair(ex, completion(proc, n, 10 + n)) for ex, n in zip(EXAMPLES, lengths)]
    batch = proc.collate(pairs)
    C = batch.completion_ids_BC.shape[1]
    for side_name in ("student", "teacher"):
        with torch.no_grad():
            got_BCV = completion_logits(model, getattr(batch, side_name), C)
        for i, pair in enumerate(pairs):
            alone = proc.collate([pair])
            with torch.no_grad():
                ref_CV = completion_logits(model, getattr(alone, side_name), lengths[i])[0]
            got_CV = got_BCV[i, : lengths[i]]
            diff = (got_CV - ref_CV).abs().max().item()
            assert diff < 1e-4, (side_name, pair.example_id, diff)


def test_padding_invariance_with_text_only_rows(proc, model):
    """Rows without images, alone or beside image rows, also match their single runs."""
    text_only = (
        Example(id="t1", question="What is 2 + 2?", privileged="4."),
        Example(id="t2", question="A longer question about apples and pears?", privileged="No."),
    )
    for combo in (text_only, text_only + EXAMPLES[:1]):
        pairs = [proc.pair(ex, completion(proc, 5 + i, i)) for i, ex in enumerate(combo)]
        batch = proc.collate(pairs)
        assert ("pixel_values" in batch.student.model_inputs) is (len(combo) == 3)
        C = batch.completion_ids_BC.shape[1]
        for side_name in ("student", "teacher"):
            with torch.no_grad():
                got_BCV = completion_logits(model, getattr(batch, side_name), C)
                for i, pair in enumerate(pairs):
                    n = len(pair.completion_ids)
                    ref_CV = completion_logits(model, getattr(proc.collate([pair]), side_name), n)
                    assert (got_BCV[i, :n] - ref_CV[0]).abs().max() < 1e-4, (side_name, i)


def test_bad_image_names_example(proc, tmp_path):
    from opsd_mm.processors.images import BadImageError

    missing = dataclasses.replace(FROZEN, images=(FROZEN.images[0], str(tmp_path / "x.png")))
    with pytest.raises(BadImageError, match="vl-frozen-0.*x.png.*file not found"):
        proc.student_prompt(missing)
    # Other accepted sources work in prompts too (bytes here).
    import io

    buf = io.BytesIO()
    FROZEN.images[1].save(buf, format="PNG")
    as_bytes = dataclasses.replace(FROZEN, images=(FROZEN.images[0], buf.getvalue()))
    assert proc.student_prompt(as_bytes).input_ids == proc.student_prompt(FROZEN).input_ids


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_prepare_examples_applies_bad_image_policy(proc, tmp_path, policy):
    import io

    from opsd_mm.processors.images import BadImageError

    (tmp_path / "img").mkdir()
    buf = io.BytesIO()
    FROZEN.images[0].save(buf, format="PNG")
    (tmp_path / "img" / "ok.png").write_bytes(buf.getvalue())
    good = dataclasses.replace(EXAMPLES[0], id="good", images=("img/ok.png",))
    bad = dataclasses.replace(EXAMPLES[0], id="bad", images=("img/missing.png",))
    bad_teacher = dataclasses.replace(FROZEN, id="bad-t", teacher_images=(b"not an image",))
    p = with_cfg(proc, bad_image_policy=policy)
    if policy == "raise":
        with pytest.raises(BadImageError, match="bad.*missing.png.*file not found"):
            p.prepare_examples([good, bad], tmp_path)
        return
    kept = p.prepare_examples([good, bad, bad_teacher, FROZEN], tmp_path)
    assert [ex.id for ex in kept] == ["good", FROZEN.id]
    assert [(e.example_id, e.reason) for e in p.bad_images] == [
        ("bad", "file not found"),
        ("bad-t", p.bad_images[1].reason),
    ]
    # Relative paths were resolved, so prompts load without the data directory.
    assert kept[0].images[0] == str(tmp_path / "img" / "ok.png")
    assert p.student_prompt(kept[0]).mm_inputs["image_grid_thw"].shape == (1, 3)


def test_placeholders_can_be_kept_as_text(tmp_path_factory):
    """MathVision-style tags (<image2> with one composite image) stay verbatim text when the
    example opts out of placeholder parsing; the image goes first."""

    from opsd_mm.model.tiny import resolve_tiny
    from opsd_mm.processors.vl import QwenVLProcessor
    from opsd_mm.types import Example

    path = resolve_tiny("qwen2.5-vl", tmp_path_factory.mktemp("tiny"))
    proc = QwenVLProcessor.from_pretrained(
        str(path), ProcessorConfig(student_template="plain"), family="qwen2_5_vl"
    )
    img = Image.new("RGB", (56, 56), "red")
    q = "In <image1>, which panel <image2> is larger?"
    with pytest.raises(ValueError, match="<image2>"):
        proc.student_prompt(Example(id="mv", question=q, images=(img,)))
    p = proc.student_prompt(
        Example(id="mv", question=q, images=(img,), meta={"image_placeholders": False})
    )
    assert q in p.text
    assert p.text.index("<|vision_start|>") < p.text.index(q)
