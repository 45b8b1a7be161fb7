"""Rendered samples of a run: what the student saw, what it wrote, what the teacher was told.

Why: metrics say *that* a run drifts; a handful of rendered completions says *how* (looping,
leaked special tokens, answers copied from the privileged trace). Every ``logging.samples_every``
steps the main process appends ``logging.samples_n`` records to ``RUN_DIR/samples.jsonl``:

``step``, ``example_id``, ``student_prompt`` (the rendered ``Prompt.text``), ``completion``
(decoded with the processor's tokenizer, special tokens kept), ``completion_len``,
``privileged`` (an excerpt of the example's privileged text), ``teacher_prompt`` (an excerpt of
the rendered teacher prompt: its head and its tail) and ``divergence_mean`` (the sample's mean
per-token divergence, when the step's per-token values line up with its pairs).

When a tensorboard tracker is configured the same records go to it as text (``add_text``);
other trackers are not written (their text APIs differ; samples.jsonl has everything).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from opsd_mm.types import Example, Pair

log = logging.getLogger(__name__)

EXCERPT_CHARS = 400


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` if it fits in ``limit`` characters, else its head and tail around a marker, so
    both the start of a prompt and its end (the privileged block, the generation prompt) show."""
    if len(text) <= limit:
        return text
    half = max(limit // 2, 1)
    return f"{text[:half]} [... {len(text) - 2 * half} chars ...] {text[-half:]}"


def pick_pairs(pairs: Sequence[Pair], n: int) -> list[int]:
    """Indices of up to ``n`` pairs: one per distinct example first (in order), then the rest."""
    seen: set[str] = set()
    first, rest = [], []
    for i, p in enumerate(pairs):
        (rest if p.example_id in seen else first).append(i)
        seen.add(p.example_id)
    return (first + rest)[:n]


def per_sample_means(
    pairs: Sequence[Pair], div_N: torch.Tensor, skip_first_tokens: int
) -> list[float | None]:
    """Each pair's mean divergence, splitting the step's flat ``div_N`` by the pairs' loss-token
    counts (completion length minus ``skip_first_tokens``). All None when the counts do not add
    up to ``div_N`` (e.g. pairs and values from different processes)."""
    counts = [max(0, len(p.completion_ids) - skip_first_tokens) for p in pairs]
    if sum(counts) != div_N.numel():
        return [None] * len(pairs)
    out: list[float | None] = []
    for part in torch.split(div_N.detach().float().cpu(), counts):
        mean = part.mean().item() if part.numel() else math.nan
        out.append(mean if math.isfinite(mean) else None)  # NaN: no teacher (plain GRPO)
    return out


def sample_records(
    step: int,
    examples: Sequence[Example],
    pairs: Sequence[Pair],
    tokenizer: Any,
    n: int,
    div_N: torch.Tensor | None = None,
    skip_first_tokens: int = 0,
) -> list[dict[str, Any]]:
    """Up to ``n`` JSON-ready records of one step (see the module docstring for the fields)."""
    by_id = {ex.id: ex for ex in examples}
    means = (
        per_sample_means(pairs, div_N, skip_first_tokens)
        if div_N is not None
        else [None] * len(pairs)
    )
    records = []
    for i in pick_pairs(pairs, n):
        pair = pairs[i]
        ex = by_id.get(pair.example_id)
        records.append(
            {
                "step": step,
                "example_id": pair.example_id,
                "student_prompt": pair.student.text,
                "completion": tokenizer.decode(pair.completion_ids, skip_special_tokens=False),
                "completion_len": len(pair.completion_ids),
                "privileged": excerpt(ex.privileged) if ex is not None else "",
                "teacher_prompt": excerpt(pair.teacher.text),
                "divergence_mean": means[i],
            }
        )
    return records


def write_samples(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """Append ``records`` to the JSONL file at ``path`` (one object per line, flushed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def as_markdown(record: dict[str, Any]) -> str:
    """One record as tracker text (tensorboard renders markdown; code blocks keep whitespace)."""
    div = record.get("divergence_mean")
    head = f"**{record['example_id']}** - {record['completion_len']} tokens" + (
        f", mean divergence {div:.4g}" if div is not None else ""
    )
    parts = [head]
    for key in ("student_prompt", "completion", "privileged"):
        parts.append(f"{key}:\n\n```\n{record[key]}\n```")
    return "\n\n".join(parts)


def log_to_trackers(accelerator: Any, records: Sequence[dict[str, Any]], step: int) -> None:
    """Send records as text to a configured tensorboard tracker; other trackers are skipped."""
    try:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
    except ValueError:  # trackers configured, none of them tensorboard
        return
    if not hasattr(writer, "add_text"):
        return
    for i, r in enumerate(records):
        writer.add_text(f"samples/{i}", as_markdown(r), global_step=step)
