"""End-to-end: thinking checkpoints train with the default config.

The real Qwen3-Thinking-2507 / Qwen3-VL-Thinking templates open a think block in every generation
prompt, so the student must be able to close it. A random tiny model rarely samples ``</think>``
on its own, so each case first warm-starts the tiny model with the project's SFT loop on
completions that close the block (``reasoning</think>\\n\\n\\boxed{N}<|im_end|>``), then runs 3
OPSD steps with the real ``Trainer`` and its HF rollout engine (recorded, not replaced), and
checks what the rollouts held. The hybrid Qwen3 template with thinking off is the control: the
same warm start wants to emit ``</think>``, and the suppress list must stop it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from opsd_mm.cli import build_trainer
from opsd_mm.config import ModelConfig, load_config
from opsd_mm.data.tasks import make_arithmetic_examples
from opsd_mm.model.load import resolve_model_path

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "tests" / "fixtures" / "chat_templates"
WARM_STEPS = 30


def closing_completion(ex) -> str:
    return f"Let me think.</think>\n\n\\boxed{{{ex.answer}}}"


def warm_start(base: str, template_name: str, cfg, out: Path) -> Path:
    """The tiny model at ``base`` with the real template ``template_name``, fully fine-tuned for
    WARM_STEPS SFT steps (student context) to emit ``closing_completion``; saved to ``out``."""
    from transformers import AutoProcessor, AutoTokenizer

    from opsd_mm.data.load import load_examples
    from opsd_mm.demo.sft import make_items, train_sft
    from opsd_mm.model.load import VL_MODEL_TYPES, load_model, model_type_of
    from opsd_mm.processors import build_processor

    template = (TEMPLATES / f"{template_name}.jinja").read_text(encoding="utf-8")
    model_type = model_type_of(base)
    if model_type in VL_MODEL_TYPES:
        files = AutoProcessor.from_pretrained(base)
        files.tokenizer.chat_template = template
    else:
        files = AutoTokenizer.from_pretrained(base)
    files.chat_template = template
    files.save_pretrained(out)
    torch.manual_seed(0)
    model = load_model(base, ModelConfig(dtype="float32"))
    model.save_pretrained(out)
    for p in model.parameters():
        p.requires_grad_(True)
    processor = build_processor(cfg.processor, str(out), model_type)
    examples, _ = load_examples(cfg.data, seed=cfg.seed)
    items = make_items(processor, examples, "student", closing_completion)
    train_sft(model, processor, items, steps=WARM_STEPS, batch_size=8, lr=1e-2, warmup_steps=3)
    model.save_pretrained(out)
    return out


CASES = [
    # (tiny model, recipe, real template, the think state its prompts leave)
    ("text", "tiny_text.yaml", "qwen3-4b-thinking-2507", "open"),
    ("qwen3-vl", "tiny_vl.yaml", "qwen3-vl-8b-thinking", "open"),
    ("text", "tiny_text.yaml", "qwen3-1.7b", "closed"),
]


@pytest.mark.slow
@pytest.mark.parametrize("tiny, recipe, template_name, state", CASES)
def test_thinking_template_trains(tiny_cache, tmp_path, tiny, recipe, template_name, state):
    common = [f"model.tiny_cache_dir={tiny_cache}", "logging.progress=false"]
    base_cfg = load_config(ROOT / "configs" / recipe, [f"model.name_or_path=tiny:{tiny}", *common])
    warm = warm_start(resolve_model_path(base_cfg.model), template_name, base_cfg, tmp_path / "w")
    cfg = load_config(
        ROOT / "configs" / recipe,
        [
            f"model.name_or_path={warm}",
            f"run_dir={tmp_path / 'run'}",
            "trainer.max_steps=3",
            "trainer.save_every=0",
            *common,
        ],
    )
    assert not cfg.processor.student_thinking and not cfg.processor.teacher_thinking  # defaults
    trainer = build_trainer(cfg)
    proc = trainer.processor
    assert proc.student_think_state == proc.teacher_think_state == state
    open_id, close_id = proc.tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    assert open_id in trainer.engine.suppress_token_ids
    assert (close_id in trainer.engine.suppress_token_ids) == (state == "closed")

    recorded = []  # every rollout the real engine produced, passed on unchanged
    generate = trainer.engine.generate

    def recording_generate(prompts, n, sampling):
        out = generate(prompts, n, sampling)
        recorded.extend(r for rollouts in out for r in rollouts)
        return out

    trainer.engine.generate = recording_generate
    history = trainer.train()

    assert [m["step"] for m in history] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in history)
    assert history[-1]["rejected_completions"] == 0 and history[-1]["bad_examples"] == 0
    assert len(recorded) == 3 * cfg.trainer.batch_size * cfg.rollout.n
    assert not any(open_id in r.completion_ids for r in recorded)
    closed = [close_id in r.completion_ids for r in recorded]
    if state == "open":  # the warm-started student closes its reasoning, and it is trained on
        assert sum(closed) >= len(recorded) * 3 // 4, closed
    else:  # the closed prompt's suppress list stops it, though the model wants to close:
        assert not any(closed)
        prompt = proc.student_prompt(make_arithmetic_examples(1, seed=5)[0])
        prefix = proc.tokenizer("Let me think.", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits_BTV = trainer.model(input_ids=torch.tensor([prompt.input_ids + prefix])).logits
        assert logits_BTV[0, -1].argmax().item() == close_id
