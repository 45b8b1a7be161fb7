"""A small supervised fine-tuning loop: the demo's warm start and its SFT baseline.

Why our own loop rather than the transformers Trainer: the sequences must be laid out exactly
as OPSD lays them out (one chat-template application for the prompt, the completion ids
appended, no re-tokenisation), so SFT and OPSD see identical inputs; reusing the processor's
``pair``/``collate`` and the trainer's ``completion_logits`` gives that for text and VL alike.
The loss is the mean cross-entropy over completion tokens (the prompt is never a target).

Shape suffixes as in ``opsd_mm.types``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from opsd_mm.model.forward import completion_logits
from opsd_mm.types import Example, Pair, Processor, Prompt


@dataclass
class SFTItem:
    """One supervised sequence: a rendered prompt (either context) and its target completion."""

    example_id: str
    prompt: Prompt
    completion_ids: list[int]


def target_ids(processor: Processor, text: str) -> list[int]:
    """The completion a rollout would produce for ``text``: its tokens, then the first EOS.

    The completion is tokenised on its own, as an engine would emit it after the prompt."""
    tok = processor.tokenizer  # type: ignore[attr-defined]
    return list(tok(text, add_special_tokens=False)["input_ids"]) + [processor.eos_token_ids[0]]


def make_items(
    processor: Processor,
    examples: Sequence[Example],
    context: str,
    completion: Callable[[Example], str],
) -> list[SFTItem]:
    """SFT items in the ``student`` (question only) or ``teacher`` (question + privileged)
    context, each targeting ``completion(example)``."""
    if context not in ("student", "teacher"):
        raise ValueError(f"context must be 'student' or 'teacher', got {context!r}")
    render = processor.student_prompt if context == "student" else processor.teacher_prompt
    return [SFTItem(ex.id, render(ex), target_ids(processor, completion(ex))) for ex in examples]


def sft_loss(
    model: torch.nn.Module, processor: Processor, items: Sequence[SFTItem]
) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the completion tokens of ``items`` -> (loss, tokens).

    The prompt rides on the student side of a ``Pair`` (whatever context it was rendered in),
    so the processor's collation does the layout and image packing."""
    pairs = [Pair(it.example_id, it.prompt, it.prompt, it.completion_ids) for it in items]
    batch = processor.collate(pairs).to(next(model.parameters()).device)
    width_C = batch.completion_ids_BC.shape[1]
    logits_BCV = completion_logits(model, batch.student, width_C)
    mask_BC = batch.completion_mask_BC.bool()
    logits_NV = logits_BCV[mask_BC].float()
    ids_N = batch.completion_ids_BC[mask_BC]
    return torch.nn.functional.cross_entropy(logits_NV, ids_N), int(ids_N.numel())


def train_sft(
    model: torch.nn.Module,
    processor: Processor,
    items: Sequence[SFTItem],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """``steps`` AdamW steps over shuffled epochs of ``items`` (cosine decay after a linear
    warm-up); trains the parameters that require grad. Returns per-step metric dicts."""
    if not items:
        raise ValueError("train_sft() got no items")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    rng = random.Random(f"sft-{seed}")
    order: list[int] = []
    history = []
    model.train()
    for step in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(items)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = [items[i] for i in order[:batch_size]]
        del order[:batch_size]
        loss, n_tokens = sft_loss(model, processor, batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        record = {
            "step": step + 1,
            "loss": loss.item(),
            "grad_norm": float(norm),
            "lr": sched.get_last_lr()[0],
            "tokens": n_tokens,
        }
        history.append(record)
        if on_step is not None:
            on_step(record)
    model.eval()
    return history
