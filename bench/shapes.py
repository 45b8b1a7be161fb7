"""Random Qwen3 text models of a chosen shape, on the tiny tokenizer, for the step benches.

The tiny tokenizer (~1.5k ids) with a model of any vocabulary size: ``vocab=151_936`` gives a
Qwen-size output layer (the ids past the tokenizer's are never fed in; sampling may produce them,
which the step benches cut to drawn lengths anyway). Throughput does not depend on weight values.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

QWEN_VOCAB = 151_936


def build_model_dir(
    out: str | Path,
    *,
    hidden: int,
    layers: int,
    vocab: int,
    heads: int = 4,
    seed: int = 0,
    kv_heads: int | None = None,
    head_dim: int | None = None,
    intermediate: int | None = None,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random Qwen3ForCausalLM saved with the tiny tokenizer into ``out``; returns ``out``.
    Defaults: kv_heads heads/2, head_dim hidden/heads, intermediate 3 x hidden, untied head,
    fp32. A Qwen3-1.7B shape: hidden 2048, 28 layers, 16 heads, 8 kv heads, head_dim 128,
    intermediate 6144, tied embeddings (built in ``dtype``: bf16 halves the memory)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opsd_mm.model.tiny import resolve_tiny

    out = Path(out)
    tiny = resolve_tiny("text")
    out.mkdir(parents=True, exist_ok=True)
    for f in tiny.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    base = Qwen3Config.from_pretrained(tiny)
    cfg = Qwen3Config(
        vocab_size=max(vocab, base.vocab_size),
        hidden_size=hidden,
        intermediate_size=intermediate or 3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or max(1, heads // 2),
        head_dim=head_dim or hidden // heads,
        max_position_embeddings=8192,
        tie_word_embeddings=tie,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
    )
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        Qwen3ForCausalLM(cfg).save_pretrained(out)
    finally:
        torch.set_default_dtype(default)
    return out


def lognormal_lengths(n: int, mean: float, sigma: float, cap: int, seed: int) -> list[int]:
    """``n`` completion lengths from a lognormal with the given mean (before the cap) and
    shape sigma, clipped to [1, cap]: a long tail (max/mean ~4-6 at sigma 1, n >= 16)."""
    import math
    import random

    rng = random.Random(seed)
    mu = math.log(mean) - sigma**2 / 2
    return [max(1, min(cap, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]
