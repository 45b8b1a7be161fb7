"""The real Qwen chat templates (tests/fixtures/chat_templates) on the tiny tokenizer and tiny VL
processors, thinking on and off: the think state each template leaves, the think tags a rollout
may sample, prompt ids from one template application, completions right after each side's
prompt, ``pair`` accepting ``...</think>`` under an open block and rejecting it under a closed
one, and (VL) M-RoPE positions per side under every template (padding invariance)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

from opsd_mm.config import ProcessorConfig
from opsd_mm.model.forward import completion_logits
from opsd_mm.processors.text import TextProcessor, strip_special_tokens
from opsd_mm.processors.thinking import think_state, think_tags_to_suppress
from opsd_mm.processors.vl import QwenVLProcessor
from opsd_mm.types import Example, PairBatch
from tests.fixtures.vl_examples import EXAMPLES as VL_EXAMPLES

TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"

EX = Example(
    id="real-0",
    question="Tom has 12 apples and buys 3 bags of 7 apples each. How many apples does he have?",
    privileged="3 * 7 = 21 and 12 + 21 = 33, so \\boxed{33}.",
    answer="33",
)
TEXT_EXAMPLES = (
    EX,
    Example(id="real-1", question="What is 2 + 2?", privileged="2 + 2 = 4. \\boxed{4}"),
)
# The generation prompt each think state ends with, in every real template.
GENERATION_PROMPT = {
    "open": "<|im_start|>assistant\n<think>\n",
    "closed": "<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "none": "<|im_start|>assistant\n",
}
# (template, thinking) -> the think state its generation prompt leaves.
TEXT_CASES = {
    ("qwen3-1.7b", False): "closed",
    ("qwen3-1.7b", True): "none",
    ("qwen3-4b-instruct-2507", False): "none",
    ("qwen3-4b-instruct-2507", True): "none",
    ("qwen3-4b-thinking-2507", False): "open",
    ("qwen3-4b-thinking-2507", True): "open",
}
# (tiny family, processor kind, template, think state): each family with its own templates.
VL_CASES = [
    ("qwen2-vl", "qwen2_vl", "qwen2-vl-7b-instruct", "none"),
    ("qwen2.5-vl", "qwen2_5_vl", "qwen2.5-vl-7b-instruct", "none"),
    ("qwen3-vl", "qwen3_vl", "qwen3-vl-8b-instruct", "none"),
    ("qwen3-vl", "qwen3_vl", "qwen3-vl-8b-thinking", "open"),
]
CLOSING = "Some reasoning about the apples.</think>\n\n\\boxed{33}"
WHOLE_BLOCK = "<think>\nSome reasoning.\n</think>\n\n\\boxed{33}"


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def text_processor(tiny_text_dir: Path, name: str, thinking: bool, **cfg) -> TextProcessor:
    """The tiny tokenizer with the real template ``name`` and both roles' thinking set."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_dir)
    tok.chat_template = template(name)
    return TextProcessor(
        tok, ProcessorConfig(student_thinking=thinking, teacher_thinking=thinking, **cfg)
    )


def vl_processor(path: Path, kind: str, name: str, thinking: bool = False) -> QwenVLProcessor:
    """The tiny VL processor (and its tokenizer) with the real template ``name``."""
    from transformers import AutoProcessor

    hf = AutoProcessor.from_pretrained(path)
    hf.chat_template = hf.tokenizer.chat_template = template(name)
    cfg = ProcessorConfig(student_thinking=thinking, teacher_thinking=thinking)
    return QwenVLProcessor(hf, cfg, kind)


def completion_ids(proc, text: str) -> list[int]:
    """``text`` as a rollout would emit it: its tokens, then the first EOS."""
    return proc.tokenizer(text, add_special_tokens=False)["input_ids"] + [proc.eos_token_ids[0]]


def think_ids(proc) -> tuple[int, int]:
    return tuple(proc.tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>"))


def assert_completions_follow_prompts(batch: PairBatch, pairs, pad_id: int) -> None:
    """On each side, every row is [pad | its prompt | its completion | pad] with the completion at
    P .. P+n-1, and the masks select exactly the real tokens."""
    C = batch.completion_ids_BC.shape[1]
    for side_name in ("student", "teacher"):
        side = getattr(batch, side_name)
        P, ids_BT, mask_BT = side.prompt_width, side.input_ids_BT, side.attention_mask_BT
        for i, pair in enumerate(pairs):
            prompt, comp = getattr(pair, side_name).input_ids, pair.completion_ids
            n = len(comp)
            assert ids_BT[i, P - len(prompt) : P].tolist() == prompt
            assert ids_BT[i, P : P + n].tolist() == comp
            assert batch.completion_mask_BC[i].tolist() == [1] * n + [0] * (C - n)
            real = [0] * (P - len(prompt)) + [1] * (len(prompt) + n) + [0] * (C - n)
            assert mask_BT[i].tolist() == real
            assert (ids_BT[i, P + n :] == pad_id).all()


# ----------------------------------------------------------------------------- fixtures


def test_fixture_files_match_sources():
    """Every template file is listed in SOURCES.md with its sha256, and has not drifted."""
    rows = re.findall(
        r"^\| (\S+\.jinja) \| [^|]+ \| ([0-9a-f]{64}) \|$",
        (TEMPLATES / "SOURCES.md").read_text(),
        re.MULTILINE,
    )
    assert {f for f, _ in rows} == {p.name for p in TEMPLATES.glob("*.jinja")}
    for name, digest in rows:
        assert hashlib.sha256((TEMPLATES / name).read_bytes()).hexdigest() == digest, name


def test_real_template_facts(tiny_text_dir):
    """What makes these templates matter: Thinking-2507 always opens a think block; the hybrid
    template closes an empty one only with thinking off; the Qwen2(.5)-VL template adds a
    default system message; the others leave the generation prompt bare."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_dir)
    chat = [{"role": "user", "content": "Hi"}]

    def render(name: str, thinking: bool) -> str:
        return tok.apply_chat_template(
            chat,
            chat_template=template(name),
            add_generation_prompt=True,
            enable_thinking=thinking,
            tokenize=False,
        )

    for thinking in (False, True):
        thinking_2507 = render("qwen3-4b-thinking-2507", thinking)
        assert thinking_2507 == "<|im_start|>user\nHi<|im_end|>\n" + GENERATION_PROMPT["open"]
        for name, state in (
            ("qwen3-4b-instruct-2507", "none"),
            ("qwen3-vl-8b-instruct", "none"),
            ("qwen3-vl-8b-thinking", "open"),
        ):
            expected = "<|im_start|>user\nHi<|im_end|>\n" + GENERATION_PROMPT[state]
            assert render(name, thinking) == expected, name
        system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        user = "<|im_start|>user\nHi<|im_end|>\n"
        assert render("qwen2-vl-7b-instruct", thinking) == system + user + GENERATION_PROMPT["none"]
    assert render("qwen3-1.7b", False).endswith(GENERATION_PROMPT["closed"])
    assert render("qwen3-1.7b", True).endswith("<|im_end|>\n" + GENERATION_PROMPT["none"])
    assert template("qwen2-vl-7b-instruct") == template("qwen2.5-vl-7b-instruct")


def test_think_state_and_suppressed_tags():
    assert think_state("<|im_start|>assistant\n<think>\n") == "open"
    assert think_state("<|im_start|>assistant\n<think>\n\n</think>\n\n") == "closed"
    assert think_state("<|im_start|>assistant\n") == "none"
    # Think tags in the question are content; only the end of the prompt counts.
    assert think_state("user\nWhy <think>?<|im_end|>\n<|im_start|>assistant\n") == "none"
    assert think_tags_to_suppress("open", False) == think_tags_to_suppress("open", True)
    assert think_tags_to_suppress("open", False) == ("<think>",)
    assert think_tags_to_suppress("closed", True) == ("<think>", "</think>")
    assert think_tags_to_suppress("none", False) == ("<think>", "</think>")
    assert think_tags_to_suppress("none", True) == ()


# ----------------------------------------------------------------------------- text


@pytest.mark.parametrize("name, thinking", list(TEXT_CASES))
def test_text_real_template(tiny_text_dir, monkeypatch, name, thinking):
    proc = text_processor(tiny_text_dir, name, thinking)
    state = TEXT_CASES[name, thinking]
    assert proc.student_think_state == proc.teacher_think_state == state
    open_id, close_id = think_ids(proc)
    suppressed = {
        t for t, i in (("<think>", open_id), ("</think>", close_id)) if i in proc.suppress_token_ids
    }
    assert suppressed == set(think_tags_to_suppress(state, thinking))

    def no_decode(*args, **kwargs):
        raise AssertionError("prompt rendering must not decode ids")

    monkeypatch.setattr(proc.tokenizer, "decode", no_decode)
    for prompt in (proc.student_prompt(EX), proc.teacher_prompt(EX)):
        assert prompt.text.endswith("<|im_end|>\n" + GENERATION_PROMPT[state])
        assert prompt.meta["think_state"] == state
        assert not prompt.text.startswith("<|im_start|>system")
        # One template application: the ids are the template's own tokenisation of the text.
        assert prompt.input_ids == proc.tokenizer(prompt.text, add_special_tokens=False).input_ids

    # A completion that closes the block is accepted when the block is open (or when the prompt
    # has none and thinking is on); a whole <think>...</think> block only in the latter case.
    for text, ok in ((CLOSING, state == "open" or thinking), (WHOLE_BLOCK, suppressed == set())):
        ids = completion_ids(proc, text)
        if not ok:
            with pytest.raises(ValueError, match=r"real-0.*suppressed id.*think>'.*think block"):
                proc.pair(EX, ids)
            continue
        pairs = [proc.pair(ex, ids[: len(ids) - 3 * k]) for k, ex in enumerate(TEXT_EXAMPLES)]
        assert close_id in pairs[0].completion_ids
        assert_completions_follow_prompts(proc.collate(pairs), pairs, proc.pad_token_id)


def test_thinking_template_ids_and_suppression(tiny_text_dir):
    """Qwen3-Thinking-2507 with the default config (student_thinking=false): the prompt ends in
    the open block's ids and </think> stays samplable (before: both tags were suppressed)."""
    proc = text_processor(tiny_text_dir, "qwen3-4b-thinking-2507", False)
    open_id, close_id = think_ids(proc)
    assert open_id in proc.suppress_token_ids and close_id not in proc.suppress_token_ids
    tail = proc.tokenizer("<|im_start|>assistant\n<think>\n", add_special_tokens=False).input_ids
    prompt = proc.student_prompt(EX)
    assert prompt.input_ids[-len(tail) :] == tail
    hybrid_off = text_processor(tiny_text_dir, "qwen3-1.7b", False)
    assert {open_id, close_id} <= set(hybrid_off.suppress_token_ids)


# ----------------------------------------------------------------------------- specials_stripped


@pytest.mark.parametrize(
    "name, thinking", [("qwen3-1.7b", False), ("qwen3-4b-thinking-2507", False)]
)
def test_specials_stripped_student_prompt(tiny_text_dir, name, thinking):
    """The OPSD reference's student prompt: the template text without special tokens, tokenised
    as plain text - what decoding the template ids with skip_special_tokens=True gives."""
    plain = text_processor(tiny_text_dir, name, thinking)
    proc = text_processor(tiny_text_dir, name, thinking, student_prompt_format="specials_stripped")
    student, reference = proc.student_prompt(EX), plain.student_prompt(EX)
    message = proc.student_template.render(EX.question)
    generation = GENERATION_PROMPT[TEXT_CASES[name, thinking]].replace("<|im_start|>", "")
    assert student.text == f"user\n{message}\n{generation}"
    assert student.text == proc.tokenizer.decode(reference.input_ids, skip_special_tokens=True)
    assert student.text == strip_special_tokens(reference.text, proc._control_strings)
    assert student.input_ids == proc.tokenizer(student.text, add_special_tokens=False).input_ids
    # Not the template ids minus the special ones: "{}." + "\n" are re-encoded as "{}" ".\n".
    special = {proc.tokenizer.convert_tokens_to_ids(t) for t in proc._control_strings}
    assert student.input_ids != [i for i in reference.input_ids if i not in special]
    assert not set(student.input_ids) & special
    assert student.meta["student_prompt_format"] == "specials_stripped"
    assert student.meta["think_state"] == plain.student_think_state
    # The teacher keeps the chat template; suppression is unchanged.
    assert proc.teacher_prompt(EX).input_ids == plain.teacher_prompt(EX).input_ids
    assert proc.suppress_token_ids == plain.suppress_token_ids
    pair = proc.pair(EX, completion_ids(proc, CLOSING if "thinking" in name else "\\boxed{33}"))
    assert_completions_follow_prompts(proc.collate([pair]), [pair], proc.pad_token_id)


def test_specials_stripped_rejected_for_vl(tiny_cache):
    from opsd_mm.model.tiny import resolve_tiny

    with pytest.raises(ValueError, match="processor.student_prompt_format=specials_stripped"):
        QwenVLProcessor.from_pretrained(
            resolve_tiny("qwen2.5-vl", tiny_cache),
            ProcessorConfig(student_prompt_format="specials_stripped"),
            family="qwen2_5_vl",
        )


# ----------------------------------------------------------------------------- VL


@pytest.fixture(scope="module")
def vl_models(tiny_cache):
    """family -> (model dir, eval model), loaded once per module."""
    from transformers import AutoModelForImageTextToText

    from opsd_mm.model.tiny import resolve_tiny

    cache = {}

    def get(family: str):
        if family not in cache:
            path = resolve_tiny(family, tiny_cache)
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
            cache[family] = (path, model.eval())
        return cache[family]

    return get


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("family, kind, name, state", VL_CASES)
def test_vl_real_template(vl_models, family, kind, name, state, thinking):
    path, _ = vl_models(family)
    proc = vl_processor(path, kind, name, thinking)
    assert proc.student_think_state == proc.teacher_think_state == state
    open_id, close_id = think_ids(proc)
    suppressed = {
        t for t, i in (("<think>", open_id), ("</think>", close_id)) if i in proc.suppress_token_ids
    }
    assert suppressed == set(think_tags_to_suppress(state, thinking))
    for ex in VL_EXAMPLES:
        for prompt in (proc.student_prompt(ex), proc.teacher_prompt(ex)):
            assert prompt.text.endswith("<|im_end|>\n" + GENERATION_PROMPT[state])
            assert prompt.text.startswith("<|im_start|>system") == name.startswith("qwen2")
            # One template application: expanding each <|image_pad|> gives the ids.
            counts = (prompt.mm_inputs["image_grid_thw"].prod(-1) // 4).tolist()
            pieces = prompt.text.split("<|image_pad|>")
            expanded = pieces[0] + "".join(
                "<|image_pad|>" * n + rest for n, rest in zip(counts, pieces[1:])
            )
            assert prompt.input_ids == proc.tokenizer(expanded, add_special_tokens=False).input_ids
    closing = completion_ids(proc, CLOSING)
    if "</think>" not in suppressed:  # open block, or no block and thinking on
        pairs = [proc.pair(ex, closing[: len(closing) - 2 * k]) for k, ex in enumerate(VL_EXAMPLES)]
        batch = proc.collate(pairs)
        assert_completions_follow_prompts(batch, pairs, proc.pad_token_id)
        for side in (batch.student, batch.teacher):  # completion tokens are text for M-RoPE
            assert not side.model_inputs["mm_token_type_ids"][:, side.prompt_width :].any()
    else:
        with pytest.raises(ValueError, match=r"vl-frozen-0.*'</think>'.*think block 'none'"):
            proc.pair(VL_EXAMPLES[1], closing)


@pytest.mark.parametrize("family, kind, name, state", VL_CASES)
def test_vl_mrope_per_side_under_real_template(vl_models, family, kind, name, state):
    """A padded batch of pairs (different image counts and sizes, different prompt lengths per
    side) gives each pair's completion logits as if it ran alone: the model's M-RoPE indices are
    computed per row and side from that side's own tokens and grids, under every template."""
    path, model = vl_models(family)
    proc = vl_processor(path, kind, name)
    text = CLOSING if state == "open" else "Counting: \\boxed{5}"
    base = completion_ids(proc, text)
    lengths = (len(base), len(base) - 4, len(base) - 2)
    pairs = [proc.pair(ex, base[:n]) for ex, n in zip(VL_EXAMPLES, lengths)]
    batch = proc.collate(pairs)
    C = batch.completion_ids_BC.shape[1]
    for side_name in ("student", "teacher"):
        with torch.no_grad():
            got_BCV = completion_logits(model, getattr(batch, side_name), C)
            for i, pair in enumerate(pairs):
                alone = getattr(proc.collate([pair]), side_name)
                ref_CV = completion_logits(model, alone, lengths[i])[0]
                diff = (got_BCV[i, : lengths[i]] - ref_CV).abs().max().item()
                assert diff < 1e-4, (name, side_name, pair.example_id, diff)


def test_prompt_think_state_must_match_the_probe(tiny_text_dir):
    """The suppress list is set once, from a probe prompt; a template that ends some prompts
    differently (here: opening a block for 'deep' questions) is an error naming the example."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_dir)
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% if 'deep' in messages[-1].content %}{{ '<think>\\n' }}{% endif %}{% endif %}"
    )
    proc = TextProcessor(tok, ProcessorConfig())
    assert proc.student_think_state == "none"
    assert proc.student_prompt(EX).meta["think_state"] == "none"
    deep = Example(id="deep-1", question="A deep question?", privileged="Yes.")
    with pytest.raises(ValueError, match="deep-1.*student prompt's think block is 'open'.*'none'"):
        proc.student_prompt(deep)
