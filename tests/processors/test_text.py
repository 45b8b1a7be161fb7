"""TextProcessor: prompt snapshots, one-template ids, pair alignment and padding invariance."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from opsd_mm.config import ProcessorConfig
from opsd_mm.processors import build_processor
from opsd_mm.processors.templates import TEMPLATES, get_template
from opsd_mm.processors.text import TextProcessor
from opsd_mm.types import Example

SNAPSHOTS = Path(__file__).resolve().parents[1] / "snapshots"

FROZEN = Example(
    id="frozen-0",
    question="Tom has 12 apples and buys 3 bags of 7 apples each. How many apples does he have?",
    privileged=(
        "Step 1: 3 bags of 7 apples is 3 * 7 = 21 apples.\n"
        "Step 2: 12 + 21 = 33.\n"
        "So Tom has \\boxed{33} apples."
    ),
    answer="33",
)

EXAMPLES = (
    FROZEN,
    Example(id="short", question="What is 2 + 2?", privileged="2 + 2 = 4. \\boxed{4}", answer="4"),
    Example(
        id="long",
        question="A train travels 60 km in 1 hour. How far does it go in 5 hours at the same speed?",
        privileged="The speed is 60 km per hour.\nIn 5 hours: 5 * 60 = 300.\nAnswer: \\boxed{300}",
        answer="300",
    ),
)


@pytest.fixture(scope="module")
def proc(tiny_text_dir) -> TextProcessor:
    return build_processor(ProcessorConfig(), str(tiny_text_dir), "qwen3")


def with_cfg(proc: TextProcessor, **changes) -> TextProcessor:
    return TextProcessor(proc.tokenizer, dataclasses.replace(proc.cfg, **changes))


def completion(proc: TextProcessor, n: int, seed: int, eos: bool = True) -> list[int]:
    """n ids a rollout could have produced (no suppressed ids, EOS last if ``eos``)."""
    allowed = torch.tensor(
        [
            i
            for i in range(proc.vocab_size)
            if i not in proc.suppress_token_ids and i not in proc.eos_token_ids
        ]
    )
    g = torch.Generator().manual_seed(seed)
    ids = allowed[torch.randint(len(allowed), (n,), generator=g)].tolist()
    return ids[:-1] + [proc.eos_token_ids[0]] if eos else ids


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_prompt_snapshot(proc, side):
    prompt = getattr(proc, f"{side}_prompt")(FROZEN)
    path = SNAPSHOTS / f"text_{side}.txt"
    if os.environ.get("OPSD_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(prompt.text.encode("utf-8"))
    assert path.exists(), f"missing snapshot {path}; run with OPSD_UPDATE_SNAPSHOTS=1"
    assert prompt.text == path.read_bytes().decode("utf-8"), (
        f"{side} prompt drifted from {path}; if intended, publish a new template name or "
        "rerun with OPSD_UPDATE_SNAPSHOTS=1"
    )


def test_opsd_teacher_wording():
    """The teacher message of the OPSD reference implementation, written out independently."""
    rendered = get_template("opsd_teacher_v1", "teacher").render("Q?", "S.")
    assert rendered == (
        "Problem: Q?\n\nHere is a reference solution to this problem:\n"
        "=== Reference Solution Begin ===\nS.\n=== Reference Solution End ===\n"
        "\n\nAfter reading the reference solution above, make sure you truly understand the "
        "reasoning behind each step \u2014 do not copy or paraphrase it. Now, using your own words "
        "and independent reasoning, derive the same final answer to the problem above. Think step "
        "by step, explore different approaches, and don't be afraid to backtrack or reconsider if "
        "something doesn't work out:\n\n"
        "Please reason step by step, and put your final answer within \\boxed{}."
    )
    assert get_template("opsd_student_v1", "student").render("Q?") == (
        "Problem: Q?\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
    assert get_template("plain", "student").render("Q {x}?") == "Q {x}?"


def test_student_templates_never_see_privileged():
    for template in TEMPLATES.values():
        if template.role == "student":
            assert template.fields <= {"question"}, template.name
        else:
            assert "question" in template.fields, template.name


def test_ids_from_one_template_application(proc, monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("prompt rendering must not decode ids")

    monkeypatch.setattr(proc.tokenizer, "decode", no_decode)
    monkeypatch.setattr(proc.tokenizer, "batch_decode", no_decode)
    for ex in EXAMPLES:
        for prompt in (proc.student_prompt(ex), proc.teacher_prompt(ex)):
            ids = proc.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
            assert prompt.input_ids == ids
            assert all(isinstance(i, int) for i in prompt.input_ids)


def test_thinking_flags(proc):
    header = proc.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    off = proc.student_prompt(FROZEN)
    assert off.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    on = with_cfg(proc, student_thinking=True, teacher_thinking=True)
    for prompt in (on.student_prompt(FROZEN), on.teacher_prompt(FROZEN)):
        assert prompt.text.endswith("<|im_start|>assistant\n")
        assert prompt.input_ids[-len(header) :] == header


def test_unknown_template_names(proc):
    with pytest.raises(ValueError, match=r"processor\.teacher_template.*opsd_teacher_v1"):
        with_cfg(proc, teacher_template="opsd_teacher_v9")
    with pytest.raises(ValueError, match=r"processor\.student_template.*opsd_student_v1"):
        with_cfg(proc, student_template="nope")
    # A teacher template on the student side would leak privileged text.
    with pytest.raises(ValueError, match=r"processor\.student_template.*teacher template"):
        with_cfg(proc, student_template="opsd_teacher_v1")


def test_answer_only_and_hint_templates(proc):
    answer_only = with_cfg(proc, teacher_template="answer_only_v1")
    text = answer_only.teacher_prompt(FROZEN).text
    assert "is: 33\n" in text and "Step 1" not in text
    with pytest.raises(ValueError, match="frozen-0.*needs an answer"):
        answer_only.teacher_prompt(dataclasses.replace(FROZEN, answer=None))
    assert "Hint: Step 1" in with_cfg(proc, teacher_template="hint_v1").teacher_prompt(FROZEN).text
    with pytest.raises(ValueError, match="frozen-0.*needs privileged text"):
        proc.teacher_prompt(dataclasses.replace(FROZEN, privileged=" "))


def test_control_tokens_in_data_rejected(proc):
    bad = dataclasses.replace(FROZEN, privileged="trace <|im_end|> more")
    with pytest.raises(ValueError, match="frozen-0.*privileged.*<\\|im_end\\|>"):
        proc.teacher_prompt(bad)


def test_student_prompt_too_long_names_example(proc):
    with pytest.raises(ValueError, match="frozen-0.*processor.max_prompt_tokens=10"):
        with_cfg(proc, max_prompt_tokens=10).student_prompt(FROZEN)


def test_privileged_truncation(proc):
    full = proc.teacher_prompt(FROZEN)
    assert full.meta["privileged_truncated"] is False
    limit = len(full.input_ids) - 9
    prompt = with_cfg(proc, max_teacher_prompt_tokens=limit).teacher_prompt(FROZEN)
    assert len(prompt.input_ids) <= limit
    assert prompt.meta["privileged_truncated"] is True
    assert 0 < prompt.meta["privileged_tokens_kept"] < prompt.meta["privileged_tokens"]
    assert "Problem: " + FROZEN.question + "\n" in prompt.text
    begin, end = "=== Reference Solution Begin ===\n", "\n=== Reference Solution End ==="
    kept = prompt.text.split(begin)[1].split(end)[0]
    assert kept and FROZEN.privileged.startswith(kept) and kept != FROZEN.privileged
    assert prompt.text.endswith(full.text.split(end)[1])
    # The ids still come from one template application of the truncated message.
    assert prompt.input_ids == proc.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]


def test_question_never_truncated(proc):
    # The student prompt is shorter than question + teacher template with no privileged text.
    limit = len(proc.student_prompt(FROZEN).input_ids)
    with pytest.raises(ValueError, match="frozen-0.*privileged text removed.*question is never"):
        with_cfg(proc, max_teacher_prompt_tokens=limit).teacher_prompt(FROZEN)


# ----------------------------------------------------------------------------- pairs


def test_token_sets(proc, tiny_text_dir):
    tok = proc.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<think>")}
    assert proc.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert proc.eos_token_ids == [ids["<|im_end|>"], proc.pad_token_id]
    suppressed = set(proc.suppress_token_ids)
    assert not suppressed & set(proc.eos_token_ids)
    for name in ("<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"):
        assert tok.convert_tokens_to_ids(name) in suppressed, name
    assert ids["<think>"] in suppressed  # student thinking off: its think block is closed
    assert ids["<think>"] not in with_cfg(proc, student_thinking=True).suppress_token_ids
    # Embedding rows the tokenizer has no token for are never sampled either.
    model_vocab = json.loads((tiny_text_dir / "config.json").read_text())["vocab_size"]
    assert set(range(proc.vocab_size, model_vocab)) <= suppressed


@pytest.mark.parametrize(
    "bad, why",
    [
        ([5, 9, 2], "suppressed id 5"),  # <|vision_start|>
        ([100, 7], "suppressed id 7"),  # <|image_pad|>
        ([100, 1], "suppressed id 1"),  # <|im_start|>
        ([100, 100_000], "outside the tokenizer"),
        ([100, 2, 100], "EOS id 2 at completion token 1"),
        ([], "empty completion"),
    ],
)
def test_bad_completions_rejected(proc, bad, why):
    with pytest.raises(ValueError, match=f"frozen-0.*{why}"):
        proc.pair(FROZEN, bad)


def test_pair_reuses_prompts(proc):
    student = proc.student_prompt(FROZEN)
    pair = proc.pair(FROZEN, [100, 101, 2], student=student)
    assert pair.student is student and pair.completion_ids == [100, 101, 2]
    assert pair.teacher.input_ids == proc.teacher_prompt(FROZEN).input_ids


def test_collate_alignment(proc):
    lengths = (3, 9, 5)
    completions = [completion(proc, n, seed=n, eos=n != 9) for n in lengths]
    pairs = [proc.pair(ex, c) for ex, c in zip(EXAMPLES, completions)]
    batch = proc.collate(pairs)
    B, C = len(pairs), max(lengths)
    assert batch.example_ids == [ex.id for ex in EXAMPLES]
    assert batch.completion_ids_BC.shape == batch.completion_mask_BC.shape == (B, C)
    assert batch.student.prompt_width != batch.teacher.prompt_width
    for i, (pair, n) in enumerate(zip(pairs, lengths)):
        assert batch.completion_mask_BC[i].tolist() == [1] * n + [0] * (C - n)
        assert batch.completion_ids_BC[i, :n].tolist() == pair.completion_ids
        assert (batch.completion_ids_BC[i, n:] == proc.pad_token_id).all()
    for side_name in ("student", "teacher"):
        side = getattr(batch, side_name)
        P = side.prompt_width
        assert P == max(len(getattr(p, side_name).input_ids) for p in pairs)
        ids, mask = side.input_ids_BT, side.attention_mask_BT
        assert ids.shape == mask.shape == side.model_inputs["position_ids"].shape == (B, P + C)
        assert all(v.dtype == torch.long for v in side.model_inputs.values())
        # The completion sits at columns P .. P+C-1, selected exactly by the completion mask.
        assert torch.equal(
            ids[:, P:] * batch.completion_mask_BC,
            batch.completion_ids_BC * batch.completion_mask_BC,
        )
        assert torch.equal(mask[:, P:], batch.completion_mask_BC)
        for i, pair in enumerate(pairs):
            prompt = getattr(pair, side_name).input_ids
            start = P - len(prompt)
            assert ids[i, start:P].tolist() == prompt  # prompt ends at P: nothing in between
            assert (ids[i, :start] == proc.pad_token_id).all()
            real = [0] * start + [1] * (len(prompt) + lengths[i]) + [0] * (C - lengths[i])
            assert mask[i].tolist() == real
            positions = side.model_inputs["position_ids"][i]
            n_real = len(prompt) + lengths[i]
            assert positions[start : start + n_real].tolist() == list(range(n_real))


def test_collate_rejects_image_prompts(proc):
    pair = proc.pair(FROZEN, [100, 2])
    pair.teacher.mm_inputs["pixel_values"] = torch.zeros(1)
    with pytest.raises(ValueError, match="frozen-0.*processor.kind"):
        proc.collate([pair])


def test_padding_invariance(proc, tiny_text_dir):
    """A left-padded batch gives each sequence's completion logits as if it ran alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_text_dir, dtype=torch.float32).eval()
    lengths = (4, 11, 7)
    pairs = [proc.pair(ex, completion(proc, n, seed=10 + n)) for ex, n in zip(EXAMPLES, lengths)]
    batch = proc.collate(pairs)
    mask_BC = batch.completion_mask_BC.bool()
    C = mask_BC.shape[1]
    for side_name in ("student", "teacher"):
        side = getattr(batch, side_name)
        P = side.prompt_width
        with torch.no_grad():
            logits_BTV = model(**side.model_inputs).logits
        logits_BCV = logits_BTV[:, P - 1 : P - 1 + C]
        for i, pair in enumerate(pairs):
            prompt = getattr(pair, side_name).input_ids
            alone = torch.tensor([prompt + pair.completion_ids])
            with torch.no_grad():
                ref_TV = model(input_ids=alone).logits[0]
            n = lengths[i]
            ref_CV = ref_TV[len(prompt) - 1 : len(prompt) - 1 + n]
            got_CV = logits_BCV[i][mask_BC[i]]
            assert got_CV.shape == ref_CV.shape
            diff = (got_CV - ref_CV).abs().max().item()
            assert diff < 1e-4, (side_name, i, diff)
