"""Padding-free forwards and token-budget micro-batches.

Packing: the rows of a collated side (the padded layout of ``opsd_mm.types``) are laid end to
end in ONE sequence [1, S], S = the sum of the rows' real lengths, with position ids that restart
at 0 on each row and no attention mask. transformers (5.17 and later, ``masking_utils.
find_packed_sequence_indices``) reads a row boundary wherever the position ids do not step by 1
and builds a block-diagonal causal mask from them (SDPA/eager), or runs flash-attention's varlen
kernel; each row then attends to itself only, exactly as in the padded layout, without the
compute on padding. Qwen-VL models take a [4, 1, S] position tensor: row 0 the text positions
(for the mask), rows 1-3 the M-RoPE positions, computed per row in the padded layout by the
model's own ``get_rope_index`` and packed the same way.

Shape letters as in ``opsd_mm.types``; S = packed length (real tokens of all rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from opsd_mm.types import SideBatch

R = TypeVar("R")
# VL model types whose forward takes [4, 1, S] position ids (text row + M-RoPE) and whose
# get_rope_index computes the per-row M-RoPE positions (transformers 5.17-5.24).
PACKED_VL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl"})


def packed_index_BT(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Column of each padded position (b, t) in the packed sequence; a padding position gets
    its nearest real predecessor's column (clamped at 0) - a valid index whose value is never
    read, since the loss masks completion padding."""
    flat = attention_mask_BT.reshape(-1).long()
    return (flat.cumsum(0) - 1).clamp(min=0).view_as(attention_mask_BT)


def _rope_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The submodule owning Qwen-VL's ``get_rope_index`` (through PEFT/DDP wrappers)."""
    for m in model.modules():
        if hasattr(type(m), "get_rope_index"):  # the class, not a wrapper's __getattr__
            return m
    return None


def mrope_positions(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Qwen-VL M-RoPE positions [3, B, T] of a padded VL side, from the model's own
    ``get_rope_index`` (the computation its forward would run)."""
    owner = _rope_module(model)
    if owner is None:
        raise TypeError(f"{type(model).__name__} has no get_rope_index: cannot pack its VL inputs")
    kwargs = {
        k: inputs[k]
        for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids")
        if k in inputs
    }
    position_ids_3BT, _ = owner.get_rope_index(
        inputs["input_ids"], attention_mask=inputs["attention_mask"], **kwargs
    )
    return position_ids_3BT


def pack_inputs(
    model: torch.nn.Module, side: SideBatch
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(packed model inputs, packed_index_BT) for one padded side.

    Text: ``input_ids`` and ``position_ids`` [1, S]. VL: also ``mm_token_type_ids`` [1, S],
    ``position_ids`` [4, 1, S] (text positions, then M-RoPE), and the image tensors unchanged
    (rows keep their order, so the images stay in the order the model walks the grids)."""
    inputs = side.model_inputs
    mask_BT = inputs["attention_mask"].bool()
    text_pos_BT = (mask_BT.long().cumsum(-1) - 1).clamp(min=0)
    packed = {"input_ids": inputs["input_ids"][mask_BT][None]}
    if "mm_token_type_ids" in inputs:
        packed["mm_token_type_ids"] = inputs["mm_token_type_ids"][mask_BT][None]
        rope_3BT = mrope_positions(model, inputs).to(text_pos_BT.device)
        text_pos_1S = text_pos_BT[mask_BT][None]
        rope_3S = rope_3BT[:, mask_BT]
        packed["position_ids"] = torch.cat([text_pos_1S, rope_3S])[:, None, :]
    else:
        packed["position_ids"] = inputs.get("position_ids", text_pos_BT)[mask_BT][None]
    for k, v in inputs.items():
        if k not in ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids"):
            packed[k] = v
    return packed, packed_index_BT(mask_BT)


def packable(model: torch.nn.Module) -> str | None:
    """None when ``model`` supports packed forwards; otherwise the reason it does not (the
    trainer then logs it once and uses the padded layout)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl not in ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"):
        return f"attention implementation {impl!r} is not known to support packed sequences"
    kind = getattr(config, "model_type", "")
    if getattr(config, "vision_config", None) is not None and kind not in PACKED_VL_TYPES:
        return f"packed VL inputs are implemented for {sorted(PACKED_VL_TYPES)}, not {kind!r}"
    return None


# ------------------------------------------------------------------ micro-batches


def token_micro_batches(
    items: Sequence[R], lengths: Sequence[int], budget: int, *, packed: bool
) -> list[list[R]]:
    """Split ``items`` into micro-batches of at most ``budget`` forward tokens each, longest
    rows first, so micro-batches are balanced and similar lengths share a padded forward.

    The cost of a micro-batch is what its forward processes: the sum of the row lengths when
    packed, rows x the longest row when padded. A row longer than the budget forms a
    micro-batch of its own. Order inside the step does not change the loss (it is normalised
    by the step's token count), only the memory and time of each forward.
    """
    order = sorted(range(len(items)), key=lambda i: -lengths[i])
    out: list[list[R]] = []
    cur: list[int] = []
    for i in order:
        trial = cur + [i]
        cost = (
            sum(lengths[j] for j in trial)
            if packed
            else len(trial) * max(lengths[j] for j in trial)
        )
        if cur and cost > budget:
            out.append([items[j] for j in cur])
            trial = [i]
        cur = trial
    if cur:
        out.append([items[j] for j in cur])
    return out


def micro_batches(
    items: Sequence[R],
    size: int,
    tokens: int = 0,
    *,
    length: Callable[[R], int] | None = None,
    packed: bool = False,
) -> list[Sequence[R]]:
    """Rows (``tokens == 0``: chunks of ``size`` in order) or token-budget micro-batches."""
    if tokens <= 0 or length is None:
        return [items[i : i + size] for i in range(0, len(items), size)]
    return token_micro_batches(items, [length(x) for x in items], tokens, packed=packed)


def pair_length(pair: Any) -> int:
    """A pair's forward length: its longer side (prompt plus completion)."""
    c = len(pair.completion_ids)
    return max(len(pair.student.input_ids), len(pair.teacher.input_ids)) + c
