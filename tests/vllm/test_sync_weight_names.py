"""The weights a sync sends: checkpoint names and LoRA-merged values. Plain torch and peft, no
vLLM, so these run in the main environment too."""

from __future__ import annotations

import copy

import pytest
import torch

from opsd_mm.config import LoraConfig, ModelConfig
from opsd_mm.rollout.shared import checkpoint_name, iter_sync_weights
from opsd_mm.train.metrics import logprob_gap, pad_logprobs


@pytest.fixture(scope="module")
def base(tiny_text_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_text_dir, dtype=torch.float32)


def test_checkpoint_name():
    assert checkpoint_name("base_model.model.model.layers.0.mlp.up_proj.base_layer.weight") == (
        "model.layers.0.mlp.up_proj.weight"
    )
    assert checkpoint_name("base_model.model.lm_head.modules_to_save.default.weight") == (
        "lm_head.weight"
    )
    assert checkpoint_name("_orig_mod.model.norm.weight") == "model.norm.weight"
    assert checkpoint_name("model.norm.weight") == "model.norm.weight"


def test_plain_model_sends_its_state_dict(base):
    sent = dict(iter_sync_weights(base))
    want = base.state_dict()
    assert sent.keys() == want.keys()
    assert all(sent[k] is want[k] or torch.equal(sent[k], want[k]) for k in want)


def test_lora_model_sends_merged_weights_under_checkpoint_names(base):
    from opsd_mm.model.load import setup_trainable

    model = setup_trainable(copy.deepcopy(base), ModelConfig(lora=LoraConfig(r=4, alpha=8)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    sent = dict(iter_sync_weights(model))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert sent.keys() == merged.keys() == base.state_dict().keys()
    for k in merged:
        torch.testing.assert_close(sent[k], merged[k], rtol=0, atol=1e-6)
    changed = [k for k in merged if not torch.equal(sent[k], base.state_dict()[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)
    # The trainer's model is untouched: adapters still separate, base weights unmerged.
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(q.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight)
    with model.disable_adapter():  # a disabled adapter is not merged
        sent_off = dict(iter_sync_weights(model))
    assert all(torch.equal(sent_off[k], v) for k, v in base.state_dict().items())


def test_pad_logprobs_and_gap():
    lp_BC = pad_logprobs([[-1.0, -2.0], None, [-0.5]], 3)
    assert lp_BC.shape == (3, 3)
    assert lp_BC[1].isnan().all() and lp_BC[2, 1:].isnan().all()
    trainer_BC = torch.tensor([[-1.5, -2.0, 0.0], [0.0, 0.0, 0.0], [-0.25, 9.0, 9.0]])
    mask_BC = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    assert logprob_gap(lp_BC[mask_BC], trainer_BC[mask_BC]) == pytest.approx((0.5 + 0 + 0.25) / 3)
    assert logprob_gap(torch.full((2,), float("nan")), torch.zeros(2)) != 0.0  # NaN: no data
