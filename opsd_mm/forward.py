"""Model forwards restricted to what the loss needs: the columns that predict the completion.

With the layout of ``opsd_mm.types`` (prompts left-padded to P, completions right-padded to C),
the logits predicting completion token j sit at column P - 1 + j on either side, so one index
tensor selects them for ``logits_to_keep`` - the lm_head then never sees prompt positions.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from opsd_mm.types import SideBatch


def completion_logits(model: torch.nn.Module, side: SideBatch, width_C: int) -> torch.Tensor:
    """Logits predicting each completion token: columns P-1 .. P+C-2 only -> [B, C, V]."""
    P = side.prompt_width
    keep = torch.arange(P - 1, P - 1 + width_C, device=side.input_ids_BT.device)
    return model(**side.model_inputs, logits_to_keep=keep, use_cache=False).logits


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
    model: torch.nn.Module, side: SideBatch, width_C: int
) -> tuple[torch.Tensor, torch.nn.Module]:
    """Final hidden states at the columns predicting the completion -> ([B, C, H], lm_head)."""
    with lm_head_bypassed(unwrap(model)) as head:
        return completion_logits(model, side, width_C), head


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
