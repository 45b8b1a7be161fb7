"""Tensor layout of a collated batch, for the text and the vision-language processors.

Every side is laid out as in ``opsd_mm.types``: ``[pad | prompt | completion | pad]`` with
prompt width P (this side's longest prompt) and completion width C (the batch's longest
completion, the same on both sides), so completion token j sits at column P + j on each side,
and the logits that predict it at column P - 1 + j. Shape letters: B rows, T = P + C columns,
C completion columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opsd_mm.types import Pair, PairBatch, Prompt, SideBatch


def pack_side(
    prompts_B: Sequence[Sequence[int]], completions_B: Sequence[Sequence[int]], pad_id: int
) -> tuple[dict[str, torch.Tensor], int]:
    """Lay out one text side: ``[pad | prompt | completion | pad]`` with prompt width P = the
    longest prompt and completion width C = the longest completion of this batch.

    Returns (model_inputs, P); model_inputs holds ``input_ids``, ``attention_mask`` and
    ``position_ids`` (all [B, P + C], int64). Positions count real tokens only
    (cumsum(mask) - 1, clamped at 0), so left padding does not shift a sequence's positions and a
    padded batch matches each sequence run alone.
    """
    P = max(len(p) for p in prompts_B)
    C = max(len(c) for c in completions_B)
    rows, masks = [], []
    for prompt, completion in zip(prompts_B, completions_B):
        left = P - len(prompt)
        right = C - len(completion)
        rows.append([pad_id] * left + list(prompt) + list(completion) + [pad_id] * right)
        masks.append([0] * left + [1] * (len(prompt) + len(completion)) + [0] * right)
    input_ids_BT = torch.tensor(rows, dtype=torch.long)
    attention_mask_BT = torch.tensor(masks, dtype=torch.long)
    position_ids_BT = (attention_mask_BT.cumsum(-1) - 1).clamp(min=0)
    model_inputs = {
        "input_ids": input_ids_BT,
        "attention_mask": attention_mask_BT,
        "position_ids": position_ids_BT,
    }
    return model_inputs, P


def pack_completions(
    completions_B: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(completion_ids_BC, completion_mask_BC), right-padded to the batch's longest completion.
    The mask comes from the lengths, not from ``id != pad``: the pad id may be a real EOS."""
    C = max(len(c) for c in completions_B)
    ids = [list(c) + [pad_id] * (C - len(c)) for c in completions_B]
    mask = [[1] * len(c) + [0] * (C - len(c)) for c in completions_B]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def pair_batch(
    pairs: Sequence[Pair], student: SideBatch, teacher: SideBatch, pad_id: int
) -> PairBatch:
    """Both laid-out sides plus the completions of ``pairs`` (ids and mask, [B, C])."""
    completion_ids_BC, completion_mask_BC = pack_completions(
        [p.completion_ids for p in pairs], pad_id
    )
    return PairBatch(
        student=student,
        teacher=teacher,
        completion_ids_BC=completion_ids_BC,
        completion_mask_BC=completion_mask_BC,
        example_ids=[p.example_id for p in pairs],
    )


def pack_mm_side(
    prompts_B: Sequence[Prompt],
    token_types_B: Sequence[Sequence[int]],
    completions_B: Sequence[Sequence[int]],
    width_C: int,
    pad_id: int,
) -> SideBatch:
    """One vision-language side laid out as ``[pad | prompt | completion | pad]`` [B, P + C],
    with ``mm_token_type_ids`` (the prompt's token types, 0 over completion and padding) and no
    ``position_ids``: the model computes its M-RoPE positions from the tokens, grids and mask.
    Images of all rows are concatenated in row order (the model walks the grids in that order).
    """
    width_P = max(len(pr.input_ids) for pr in prompts_B)
    B, T = len(prompts_B), width_P + width_C
    input_ids_BT = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask_BT = torch.zeros((B, T), dtype=torch.long)
    mm_types_BT = torch.zeros((B, T), dtype=torch.long)
    pixels, grids = [], []
    for b, (pr, types, completion) in enumerate(zip(prompts_B, token_types_B, completions_B)):
        n, c = len(pr.input_ids), len(completion)
        input_ids_BT[b, width_P - n : width_P] = torch.tensor(pr.input_ids)
        input_ids_BT[b, width_P : width_P + c] = torch.tensor(completion, dtype=torch.long)
        attention_mask_BT[b, width_P - n : width_P + c] = 1
        mm_types_BT[b, width_P - n : width_P] = torch.tensor(types)
        if "pixel_values" in pr.mm_inputs:
            pixels.append(pr.mm_inputs["pixel_values"])
            grids.append(pr.mm_inputs["image_grid_thw"])
    inputs = {
        "input_ids": input_ids_BT,
        "attention_mask": attention_mask_BT,
        "mm_token_type_ids": mm_types_BT,
    }
    if pixels:
        inputs["pixel_values"] = torch.cat(pixels)
        inputs["image_grid_thw"] = torch.cat(grids)
    return SideBatch(model_inputs=inputs, prompt_width=width_P)
