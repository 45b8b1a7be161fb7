"""Fixtures of the model-teacher tests: the tiny teachers, a copy with its own chat template, and
the hand reference of a step's loss from the two models' logits."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY_TEXT = ROOT / "configs" / "tiny_text.yaml"
TINY_VL = ROOT / "configs" / "tiny_vl.yaml"
# Prepended to a copied teacher's chat template: the teacher's own template then renders a system
# turn the student's never does, so a teacher prompt rendered with the student's template shows.
SYSTEM_TURN = "{{- '<|im_start|>system\\nYou are a careful teacher.<|im_end|>\\n' -}}"


@pytest.fixture(scope="session")
def tiny_teacher_dir(tiny_cache):
    from opsd_mm.model.tiny import resolve_tiny

    return resolve_tiny("text-teacher", tiny_cache)


def own_template_copy(src: Path, dst: Path) -> Path:
    """A copy of the checkpoint ``src`` whose chat template opens with a system turn."""
    shutil.copytree(src, dst)
    template = dst / "chat_template.jinja"
    template.write_text(SYSTEM_TURN + template.read_text())
    return dst


@pytest.fixture(scope="session")
def teacher_own_template(tiny_teacher_dir, tmp_path_factory):
    """The tiny text teacher with its own chat template (same tokenizer, same weights)."""
    return own_template_copy(tiny_teacher_dir, tmp_path_factory.mktemp("own") / "text-teacher")


@pytest.fixture(scope="session")
def vl_teacher_own_template(tiny_cache, tmp_path_factory):
    from opsd_mm.model.tiny import resolve_tiny

    src = resolve_tiny("qwen2.5-vl-teacher", tiny_cache)
    return own_template_copy(src, tmp_path_factory.mktemp("own") / "vl-teacher")


# ----------------------------------------------------------------------------- the hand reference


def _load(path: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    vl = getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None
    cls = AutoModelForImageTextToText if vl else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def completion_logprobs(model, prompt, completion: list[int], temperature: float) -> torch.Tensor:
    """log-softmax (float64) of ``model``'s logits at the positions predicting ``completion``
    after ``prompt`` ([C, V]), from one unpadded forward of that row alone (images included)."""
    ids = torch.tensor([list(prompt.input_ids) + list(completion)])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if prompt.token_type_ids is not None:
        types = list(prompt.token_type_ids) + [0] * len(completion)
        inputs["mm_token_type_ids"] = torch.tensor([types])
    inputs.update(prompt.mm_inputs)
    logits = model(**inputs).logits[0].double()
    P = len(prompt.input_ids)
    return (logits[P - 1 : P - 1 + len(completion)] / temperature).log_softmax(-1)


def jsd_by_hand(t_logp: torch.Tensor, s_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD per token, from its definition: M = beta T + (1 - beta) S, beta KL(T||M)
    + (1 - beta) KL(S||M), summed over the vocabulary ([C])."""
    t, s = t_logp.exp(), s_logp.exp()
    log_m = (beta * t + (1 - beta) * s).log()
    return (beta * t * (t_logp - log_m) + (1 - beta) * s * (s_logp - log_m)).sum(-1)


class HandReference:
    """The step loss of ``loss.divergence=jsd`` with ``loss.normalize=step_tokens``, by hand:
    every pair's student and teacher log-distributions from single-row forwards of freshly
    loaded models and freshly built processors, the per-token JSD summed over all pairs and
    divided by the step's token count. ``teachers`` maps a teacher name to its checkpoint
    directory (its own processor renders its context)."""

    def __init__(self, cfg, student_dir: Path, teachers: dict[str, Path]) -> None:
        from opsd_mm.model.load import model_type_of
        from opsd_mm.processors import build_processor

        self.cfg = cfg
        self.student = _load(student_dir)
        self.student_proc = build_processor(
            cfg.processor, str(student_dir), model_type_of(student_dir)
        )
        self.teachers = {n: _load(d) for n, d in teachers.items()}
        self.teacher_procs = {
            n: build_processor(cfg.processor, str(d), model_type_of(d)) for n, d in teachers.items()
        }

    def per_row(self, ex, completion: list[int], teacher: str) -> torch.Tensor:
        """The per-token divergences of one completion of ``ex`` scored by ``teacher``."""
        tau = self.cfg.loss.temperature
        s = completion_logprobs(self.student, self.student_proc.student_prompt(ex), completion, tau)
        proc = self.teacher_procs[teacher]
        t = completion_logprobs(self.teachers[teacher], proc.teacher_prompt(ex), completion, tau)
        return jsd_by_hand(t, s, self.cfg.loss.beta)

    def step_loss(self, examples, pairs, teacher_of) -> tuple[float, dict[str, float]]:
        """(the step's loss, the per-teacher divergence means) for ``pairs`` of ``examples``."""
        by_id = {ex.id: ex for ex in examples}
        total, n_tokens = 0.0, 0
        per: dict[str, list[float]] = {}
        for p in pairs:
            div = self.per_row(by_id[p.example_id], p.completion_ids, teacher_of(p))
            total += div.sum().item()
            n_tokens += div.numel()
            per.setdefault(teacher_of(p), []).extend(div.tolist())
        means = {n: math.fsum(v) / len(v) for n, v in per.items()}
        return total / n_tokens, means
