"""The tiny teachers (``tiny:<student>-teacher``): the student's architecture with 4 layers, its
tokenizer and chat template, weights of their own, warm-started on the tiny corpus."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from opsd_mm.model.tiny import TEACHER_NAMES, TINY_NAMES, resolve_tiny


@pytest.mark.parametrize("student", ["text", "qwen2.5-vl"])
def test_tiny_teacher_is_a_warm_started_deeper_sibling(student, tiny_cache):
    assert f"{student}-teacher" in TEACHER_NAMES and set(TEACHER_NAMES) < set(TINY_NAMES)
    s_dir, t_dir = resolve_tiny(student, tiny_cache), resolve_tiny(f"{student}-teacher", tiny_cache)
    s_cfg = json.loads((s_dir / "config.json").read_text())
    t_cfg = json.loads((t_dir / "config.json").read_text())
    layers = [
        c.get("num_hidden_layers") or c["text_config"]["num_hidden_layers"] for c in (s_cfg, t_cfg)
    ]
    assert layers == [2, 4]
    assert (s_dir / "chat_template.jinja").read_text() == (
        t_dir / "chat_template.jinja"
    ).read_text()
    info = json.loads((t_dir / "tiny_teacher.json").read_text())
    assert info["layers"] == 4 and info["steps"] == 40
    assert info["last_loss"] < info["first_loss"] - 2  # learnt the corpus (from ln V ~ 7.3)
    s_w, t_w = load_file(s_dir / "model.safetensors"), load_file(t_dir / "model.safetensors")
    shared = [n for n in s_w if n in t_w and s_w[n].shape == t_w[n].shape and "layers.0." in n]
    assert shared and all(not torch.equal(s_w[n], t_w[n]) for n in shared)
    assert sum(v.numel() for v in t_w.values()) > sum(v.numel() for v in s_w.values())
