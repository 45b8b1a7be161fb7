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

Which attention runs a packed row decides whether packing pays. SDPA and eager attention take
the block-diagonal mask as a dense [S, S] mask and compute every block of it, the masked-off
ones included: a packed micro-batch of rows that were already similar in length (token budgets,
longest first) then costs MORE attention than the padded rows it replaced (measured on an
H200: 0.86x). flash-attention's varlen kernel (``flash_attention_2``/``3``/``4``, from the packed
position ids) and PyTorch's flex attention (``flex_attention``: a block mask built from the same
position ids, whose empty blocks are skipped) compute only each row's own causal triangle.
:func:`resolve_packing` chooses (``trainer.packing``): where such an attention exists the packed
forwards switch to it for the step (:func:`packed_attention`; generation and everything outside
the step keep the model's own attention); ``auto`` packs only then, or, with none (a CPU),
where the padded layout measured slower: rows of ``trainer.micro_batch_size``, not token
budgets (bench/step_throughput.py; docs/performance.md).

Shape letters as in ``opsd_mm.types``; S = packed length (real tokens of all rows).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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


# ------------------------------------------------------------------ attention for packed rows

# Attention implementations that compute only each packed row's own blocks.
SKIPPING_ATTENTION = (
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "flex_attention",
)


@dataclass(frozen=True)
class PackingPlan:
    """What ``trainer.packing`` resolved to: ``packed`` forwards or padded rows; ``attention``
    the implementation the packed forwards switch to (None: the model's own); ``reason`` the
    one line the trainer logs."""

    packed: bool
    attention: str | None
    reason: str


def _text_config(model: torch.nn.Module) -> Any:
    config = model.config
    get_text = getattr(config, "get_text_config", None)
    return get_text() if get_text is not None else config


def _supports(model: torch.nn.Module, flag: str) -> bool:
    """The transformers model class's ``_supports_<...>`` flag (through PEFT/DDP wrappers)."""
    for m in model.modules():
        if hasattr(type(m), "_supports_sdpa"):  # the first PreTrainedModel: the outer one
            return bool(getattr(type(m), flag, False))
    return False


def skipping_attention(
    model: torch.nn.Module, device: torch.device | str, half: bool
) -> tuple[str | None, str]:
    """(implementation, why) of an attention that skips a packed row's masked-off blocks here,
    or (None, why there is none): the model's own when it already is one; on CUDA
    flash-attention's varlen kernel when ``flash_attn`` imports, the forwards run in bf16/fp16
    (``half``) and the model class supports it, else PyTorch's flex attention (compiled by
    Triton) where the model class supports it (transformers 5.25: Qwen3 yes, Qwen-VL no)."""
    own = getattr(_text_config(model), "_attn_implementation", None) or "sdpa"
    if own in SKIPPING_ATTENTION:
        return own, f"the model's own {own}"
    if torch.device(device).type != "cuda":
        return None, (
            f"{own} attends over the whole packed block; flash-attention's varlen kernel and "
            "flex attention, which skip its masked blocks, run on CUDA"
        )
    if (
        half
        and importlib.util.find_spec("flash_attn") is not None
        and _supports(model, "_supports_flash_attn")
    ):
        return "flash_attention_2", "flash-attention's varlen kernel (flash_attn installed)"
    if (
        importlib.util.find_spec("triton") is not None
        and importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
        and _supports(model, "_supports_flex_attn")
    ):
        return "flex_attention", "PyTorch's flex attention (flash_attn not installed)"
    return None, (
        f"{own} attends over the whole packed block (flash_attn not installed, and "
        f"{type(model).__name__} has no flex attention)"
    )


def resolve_packing(
    model: torch.nn.Module,
    setting: bool | str,
    device: torch.device | str,
    *,
    half: bool,
    micro_batch_tokens: int,
) -> PackingPlan:
    """``trainer.packing`` (true, false or ``auto``) for this model on this device.

    true: packed wherever the model supports it, through a skipping attention when there is
    one. ``auto``: packed through a skipping attention; without one (a CPU), packed only for
    row micro-batches (``micro_batch_tokens`` 0), where padding to the longest row costs more
    than attending over the packed block, and padded for token budgets, which already group
    similar lengths (bench/step_throughput.py on this project's CPU; docs/performance.md): the
    layouts measured slower than padding are never the default (the skipping attentions' GPU
    figure is ``bench/gpu_checks.sh``'s to measure). false: padded."""
    if setting is False:
        return PackingPlan(False, None, "padded rows (trainer.packing=false)")
    why_not = packable(model)
    if why_not is not None:
        return PackingPlan(False, None, f"padded rows ({why_not})")
    attention, why = skipping_attention(model, device, half)
    if attention is not None:
        return PackingPlan(True, attention, f"packed rows, attention {attention} ({why})")
    if setting is True:
        return PackingPlan(True, None, f"packed rows (trainer.packing=true; {why})")
    if micro_batch_tokens <= 0:
        return PackingPlan(
            True,
            None,
            f"packed rows (auto: row micro-batches, padded to their longest row, "
            f"cost more than the packed block; {why})",
        )
    return PackingPlan(
        False, None, f"padded rows (auto: token budgets group similar lengths already; {why})"
    )


@contextmanager
def packed_attention(model: torch.nn.Module, attention: str | None) -> Iterator[None]:
    """Run the model's (text) attention as ``attention`` inside the block, then restore it;
    None: no change. Wraps a step's forwards AND backwards: a layer recomputed under gradient
    checkpointing must see the attention (and the mask type) its forward saw."""
    if attention is None:
        yield
        return
    config = _text_config(model)
    before = config._attn_implementation
    config._attn_implementation = attention
    try:
        yield
    finally:
        config._attn_implementation = before


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
