"""What a teacher forward gives the loss, whichever teacher runs it.

A micro-batch's loss (``opsd_mm.loss.micro_batch``) asks its teacher for
:class:`TeacherOutputs` through :class:`TeacherForward`: the student's own weights swapped in
(``opsd_mm.teacher.weights.Teacher``), a separate checkpoint (``opsd_mm.teacher.model``), or,
for a micro-batch that only keeps the processes in step, :class:`PaddingForward`. The fused
path reads the teacher's final hidden states and its lm_head; the naive path its logits.

Every teacher's outputs cover exactly the student's output rows (``vocab_rows``): a separate
teacher whose embedding has more rows than the student's (padding rows past the tokenizer, as
Qwen2.5-7B has over Qwen2.5-1.5B) is cut to the student's, so the two distributions are over
the same entries (``opsd_mm.teacher.vocab``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from opsd_mm.types import PairBatch, SideBatch


@dataclass
class TeacherOutputs:
    """The teacher at the N loss tokens: ``hidden_NH`` with its head ``weight_VH`` /
    ``bias_V`` (fused path; ``weight_VH`` None: the student's own head, the same module), or
    ``logits_NV`` (naive path)."""

    hidden_NH: torch.Tensor | None = None
    weight_VH: torch.Tensor | None = None
    bias_V: torch.Tensor | None = None
    logits_NV: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Bytes the loss holds of these outputs (the teacher forward's memory that outlives
        it); a head shared with the student is not counted."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.hidden_NH, self.weight_VH, self.bias_V, self.logits_NV)
            if t is not None
        )


class TeacherForward(Protocol):
    """A teacher the loss can run on a micro-batch: its outputs at the loss tokens, under
    ``torch.no_grad`` (the caller's). ``student`` is the unwrapped student module (a self
    teacher runs on it); ``batch.teacher`` is this teacher's own side of the pairs."""

    def completion_outputs(
        self,
        batch: PairBatch,
        student: torch.nn.Module,
        fused: bool,
        packed: bool,
        mask_BC: torch.Tensor,
    ) -> TeacherOutputs: ...


def cut_rows(outputs: TeacherOutputs, rows: int) -> TeacherOutputs:
    """``outputs`` over the first ``rows`` vocabulary entries (views, no copy)."""
    if outputs.logits_NV is not None and outputs.logits_NV.shape[-1] > rows:
        outputs.logits_NV = outputs.logits_NV[..., :rows]
    if outputs.weight_VH is not None and outputs.weight_VH.shape[0] > rows:
        outputs.weight_VH = outputs.weight_VH[:rows]
        if outputs.bias_V is not None:
            outputs.bias_V = outputs.bias_V[:rows]
    return outputs


def dummy_side(vl: bool, token_id: int, device: torch.device | str) -> tuple[SideBatch, int]:
    """A two-token text-only side (prompt width 1, one completion column) that any causal or
    Qwen-VL model accepts: what :class:`PaddingForward` runs a sharded teacher on, so that the
    teacher's collectives happen on every process. Returns (side, completion width)."""
    ids = torch.full((1, 2), token_id, dtype=torch.long, device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if vl:
        inputs["mm_token_type_ids"] = torch.zeros_like(ids)
    else:
        inputs["position_ids"] = torch.arange(2, device=device)[None]
    return SideBatch(model_inputs=inputs, prompt_width=1), 1


class PaddingForward:
    """The teacher of a padding micro-batch whose rows belong to another teacher.

    Why: micro-batches are grouped by teacher and every process runs as many of each teacher's
    as the busiest process (``opsd_mm.train.batches``), so under FSDP2 every process gathers a
    sharded teacher's weights the same number of times. A process with no rows for that teacher
    repeats one of its own micro-batches with weight 0; its rows are rendered for their own
    teacher, so the slot's teacher ``runs`` a dummy forward (only when ``collective``: it is
    sharded), and the loss, multiplied by 0, reads a uniform teacher (zero logits)."""

    def __init__(self, runs: TeacherForward | None, collective: bool, vl: bool, token_id: int):
        self.runs, self.collective, self.vl, self.token_id = runs, collective, vl, token_id

    def completion_outputs(
        self,
        batch: PairBatch,
        student: torch.nn.Module,
        fused: bool,
        packed: bool,
        mask_BC: torch.Tensor,
    ) -> TeacherOutputs:
        device = batch.completion_ids_BC.device
        if self.collective and self.runs is not None:
            side, width_C = dummy_side(self.vl, self.token_id, device)
            dummy = PairBatch(
                student=side,
                teacher=side,
                completion_ids_BC=side.input_ids_BT[:, 1:],
                completion_mask_BC=torch.ones(1, width_C, dtype=torch.long, device=device),
                example_ids=["padding"],
            )
            mask_11 = torch.ones(1, 1, dtype=torch.bool, device=device)
            self.runs.completion_outputs(dummy, student, fused, False, mask_11)
        head = student.get_output_embeddings().weight
        n = int(mask_BC.sum())
        if fused:  # zero hidden states through the student's head: zero logits (plus bias)
            hidden = torch.zeros(n, head.shape[1], dtype=head.dtype, device=device)
            return TeacherOutputs(hidden_NH=hidden)
        return TeacherOutputs(logits_NV=torch.zeros(n, head.shape[0], device=device))
