"""Packed (padding-free) VL forwards against the padded reference, on each tiny Qwen-VL
family: M-RoPE positions computed per row by the model's own get_rope_index, then packed."""

from __future__ import annotations

import torch

from opsd_mm.model.forward import completion_logits
from opsd_mm.types import Example
from tests.fixtures.vl_examples import EXAMPLES
from tests.fixtures.vl_examples import random_completion as completion


def test_packed_vl_logits_match_padded(proc, model):
    """Rows with different image counts and sizes, and a text-only row, packed into one
    sequence: each completion token's logits equal the padded batch's."""
    text_only = Example(id="t1", question="What is 2 + 2?", privileged="4.")
    examples = (*EXAMPLES, text_only)
    lengths = (4, 11, 7, 1)[: len(examples)]
    pairs = [proc.pair(ex, completion(proc, n, 10 + n)) for ex, n in zip(examples, lengths)]
    batch = proc.collate(pairs)
    C = batch.completion_ids_BC.shape[1]
    mask_BC = batch.completion_mask_BC.bool()
    for side_name in ("student", "teacher"):
        side = getattr(batch, side_name)
        with torch.no_grad():
            ref_NV = completion_logits(model, side, C)[mask_BC]
            got_NV = completion_logits(model, side, C, mask_BC, packed=True)
        assert got_NV.shape == ref_NV.shape
        diff = (got_NV - ref_NV).abs().max().item()
        assert diff < 1e-4, (side_name, diff)


def test_packed_vl_gradients_match_padded(proc, model):
    """Student-side gradients (full fine-tuning of the language model) packed vs padded."""
    pairs = [proc.pair(ex, completion(proc, n, n)) for ex, n in zip(EXAMPLES[:2], (3, 9))]
    batch = proc.collate(pairs)
    C = batch.completion_ids_BC.shape[1]
    mask_BC = batch.completion_mask_BC.bool()
    grads = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        logits_NV = completion_logits(model, batch.student, C, mask_BC, packed=packed)
        logits_NV.float().logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    ref, got = grads
    assert ref.keys() == got.keys() and ref
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-4, atol=1e-6), n
