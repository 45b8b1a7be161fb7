"""Model forwards restricted to what the loss needs: the columns that predict the completion.

With the layout of ``opsd_mm.types`` (prompts left-padded to P, completions right-padded to C),
the logits predicting completion token j sit at column P - 1 + j on either side, so one index
tensor selects them for ``logits_to_keep`` - the lm_head then never sees prompt positions.

``packed=True`` runs the same side padding-free (``opsd_mm.model.packing``): the rows end to end in one
sequence, and ``logits_to_keep`` lists, per selected token, its packed column. The padded layout
is the reference the packed one is tested against.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from opsd_mm.model.packing import pack_inputs
from opsd_mm.types import SideBatch


def completion_logits(
    model: torch.nn.Module,
    side: SideBatch,
    width_C: int,
    mask_BC: torch.Tensor | None = None,
    packed: bool = False,
) -> torch.Tensor:
    """Logits predicting each completion token: columns P-1 .. P+C-2 only -> [B, C, V], or
    [N, V] for the tokens selected by ``mask_BC`` (required when ``packed``: the lm_head then
    runs on those N tokens only)."""
    P = side.prompt_width
    cols_C = torch.arange(P - 1, P - 1 + width_C, device=side.input_ids_BT.device)
    if not packed:
        logits = model(**side.model_inputs, logits_to_keep=cols_C, use_cache=False).logits
        return logits if mask_BC is None else logits[mask_BC]
    if mask_BC is None:
        raise ValueError("completion_logits(packed=True) needs mask_BC")
    inputs, index_BT = pack_inputs(model, side)
    keep_N = index_BT[:, cols_C][mask_BC]
    return model(**inputs, logits_to_keep=keep_N, use_cache=False).logits[0]


@contextmanager
def lm_head_bypassed(model: torch.nn.Module):
    """Make the output projection an identity, so the model's 'logits' are the final hidden
    states; the fused loss applies the projection chunk by chunk instead. Yields the head."""
    head = model.get_output_embeddings()
    head.forward = lambda hidden: hidden  # instance attribute shadows the class method
    try:
        yield head
    finally:
        del head.forward


def completion_hidden(
    model: torch.nn.Module,
    side: SideBatch,
    width_C: int,
    mask_BC: torch.Tensor | None = None,
    packed: bool = False,
) -> tuple[torch.Tensor, torch.nn.Module]:
    """Final hidden states at the columns predicting the completion -> ([B, C, H], lm_head),
    or ([N, H], lm_head) for the tokens selected by ``mask_BC``."""
    with lm_head_bypassed(unwrap(model)) as head:
        return completion_logits(model, side, width_C, mask_BC, packed), head


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
