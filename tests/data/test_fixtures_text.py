"""The tiny text fixture: deterministic, reloadable offline, Qwen3-like where it matters."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from safetensors.torch import load_file

from opsd_mm.model.tiny.text import SPECIAL_TOKENS, build_tiny_text


@pytest.fixture
def no_network(monkeypatch):
    """Fail any connection attempt, so 'offline' is checked rather than assumed."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_same_seed_same_ids_and_weights(tiny_text_dir, tmp_path):
    again = build_tiny_text(tmp_path / "again", seed=0)
    vocab_a = json.loads((tiny_text_dir / "tokenizer.json").read_text())["model"]["vocab"]
    vocab_b = json.loads((again / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab_a == vocab_b
    weights_a = load_file(tiny_text_dir / "model.safetensors")
    weights_b = load_file(again / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name, tensor in weights_a.items():
        assert torch.equal(tensor, weights_b[name]), name


def test_reload_offline(tiny_text_dir, no_network):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_text_dir)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert type(model).__name__ == "Qwen3ForCausalLM"
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim) == (64, 2, 32)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 2, 128)
    assert cfg.vocab_size % 64 == 0 and len(tok) <= cfg.vocab_size < len(tok) + 64
    assert 1000 <= len(tok) <= 2000
    assert not cfg.tie_word_embeddings and cfg.max_position_embeddings == 4096
    assert model.dtype == torch.float32
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (2, 0, 0)
    assert model.generation_config.eos_token_id == [2, 0]
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, cfg.vocab_size)


def test_specials_are_single_tokens_with_fixed_ids(tiny_text_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_dir)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tok(token, add_special_tokens=False)["input_ids"] == [expected_id], token
    text = "x<|image_pad|><|image_pad|>y<think>z"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(7) == 2 and 3 in ids
    # Qwen3: think tags survive skip_special_tokens; control and vision tokens do not.
    assert tok.decode([3, 2, 7, 4], skip_special_tokens=True) == "<think></think>"


def test_digits_are_single_tokens(tiny_text_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_dir)
    ids = tok("12345 + 678", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert [p.strip() for p in pieces if p.strip().isdigit()] == list("12345678")
    assert all(len(p.strip()) == 1 for p in pieces if any(c.isdigit() for c in p))


def test_chat_template(tiny_text_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1 + 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2 + 2?"},
    ]
    history = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1 + 1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n2 + 2?<|im_end|>\n"
    )

    def render(**kw):
        return tok.apply_chat_template(messages, tokenize=False, **kw)

    assert render() == history
    assert render(add_generation_prompt=True, enable_thinking=True) == (
        history + "<|im_start|>assistant\n"
    )
    assert render(add_generation_prompt=True) == history + "<|im_start|>assistant\n"
    assert render(add_generation_prompt=True, enable_thinking=False) == (
        history + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    vl = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    assert tok.apply_chat_template(vl, tokenize=False) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>\n"
    )
    with pytest.raises(Exception, match="unsupported chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_chat_header_ids_round_trip(tiny_text_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_dir)
    for text in ("<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids[0] in (1, 2) and ids[-1] == tok.convert_tokens_to_ids("Ċ"), (text, ids)
        assert tok.decode(ids) == text
        assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids
