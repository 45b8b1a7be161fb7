"""Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models built offline from configs, with a processor.

Why: VL tests and the tiny VL demo must run on a CPU without a model hub, yet exercise the real
transformers code paths (M-RoPE, window attention, deepstack, variable image sizes). The model
is random but has the real architecture; the tokenizer is the tiny text tokenizer (fixed special
ids 0..8, whose chat template already renders image parts as
``<|vision_start|><|image_pad|><|vision_end|>``).

Sizes follow the pitfalls in docs/environment.md: text hidden 64 with head_dim 32 (2 heads), vision
output size == text hidden, ``mrope_section`` summing to head_dim / 2, token ids inside the small
vocabulary, Qwen3-VL patch 16, deepstack / full-attention block indexes inside the tiny depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT_HIDDEN = 64
HEAD_DIM = 32


@dataclass(frozen=True)
class TinyFamily:
    """Per-family facts the builder needs (family differences as data)."""

    model_class: str
    processor_class: str
    video_processor_class: str
    patch_size: int
    mrope_section: tuple[int, int, int]  # sums to HEAD_DIM / 2


TINY_FAMILIES: dict[str, TinyFamily] = {
    "qwen2-vl": TinyFamily(
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLProcessor",
        "Qwen2VLVideoProcessor",
        14,
        (4, 6, 6),
    ),
    "qwen2.5-vl": TinyFamily(
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLProcessor",
        "Qwen2VLVideoProcessor",
        14,
        (4, 6, 6),
    ),
    # Qwen3-VL interleaves the sections (T H W T H W ...): H and W each need 3 * n <= 16.
    "qwen3-vl": TinyFamily(
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLProcessor",
        "Qwen3VLVideoProcessor",
        16,
        (6, 5, 5),
    ),
}


def _model_config(family: str, ids: dict[str, int], vocab_size: int, num_layers: int = 2) -> Any:
    """The transformers config of the tiny model for ``family``."""
    import transformers

    fam = TINY_FAMILIES[family]
    rope = {
        "rope_type": "default",
        "rope_theta": 1_000_000.0,
        "mrope_section": list(fam.mrope_section),
    }
    text: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=TEXT_HIDDEN // HEAD_DIM,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rope_parameters=rope,
        pad_token_id=ids["<|endoftext|>"],
    )
    common = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    if family == "qwen2-vl":
        # Qwen2-VL's text attention derives head_dim = hidden / heads (no head_dim field);
        # its vision ``hidden_size`` is the output size (the merger's), ``embed_dim`` the width.
        text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
        vision = dict(
            depth=2, embed_dim=32, hidden_size=TEXT_HIDDEN, num_heads=2, mlp_ratio=2,
            patch_size=fam.patch_size, spatial_merge_size=2, temporal_patch_size=2,
        )  # fmt: skip
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    if family == "qwen2.5-vl":
        text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
        # window_size 56 = 2 merged tokens per window side, so images above 56 px use several
        # windows and the window permutation is exercised; block 1 attends globally.
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
            out_hidden_size=TEXT_HIDDEN, patch_size=fam.patch_size, spatial_merge_size=2,
            temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
        )  # fmt: skip
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    text.update(head_dim=HEAD_DIM)
    rope["mrope_interleaved"] = True
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_HIDDEN,
        patch_size=fam.patch_size, spatial_merge_size=2, temporal_patch_size=2,
        num_position_embeddings=64, deepstack_visual_indexes=[0],
    )  # fmt: skip
    return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **common)


def _hf_processor(family: str, tokenizer: Any) -> Any:
    """Image + video processor and tokenizer bundled as the family's AutoProcessor.

    Pixel bounds are small (4..1024 merged tokens per image) so tests stay fast, while a
    448 x 448 image (the benchmark size) is kept as is by the model's own resizing too.
    """
    import transformers

    fam = TINY_FAMILIES[family]
    factor = fam.patch_size * 2
    size = {"shortest_edge": 4 * factor * factor, "longest_edge": 1024 * factor * factor}
    image_processor = transformers.Qwen2VLImageProcessor(
        size=size, patch_size=fam.patch_size, merge_size=2, temporal_patch_size=2
    )
    video_processor = getattr(transformers, fam.video_processor_class)(
        size=size, patch_size=fam.patch_size, merge_size=2, temporal_patch_size=2
    )
    cls = getattr(transformers, fam.processor_class)
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )


def build_tiny_vl(
    out_dir: str | Path,
    family: str,
    seed: int = 0,
    *,
    num_layers: int = 2,
    weight_seed: int | None = None,
    warm_steps: int = 0,
) -> Path:
    """Build the tiny ``family`` model (``qwen2-vl``, ``qwen2.5-vl`` or ``qwen3-vl``) with its
    tokenizer and processor into ``out_dir``; reloadable offline with ``AutoProcessor`` and
    ``AutoModelForImageTextToText``. Deterministic for a given ``seed``; the global torch RNG is
    left as it was. The tiny teacher (:mod:`.teacher`): ``num_layers`` language-model layers,
    weights from ``weight_seed`` (default ``seed``), then ``warm_steps`` language-model steps on
    the tiny corpus (text only; the vision tower stays as drawn)."""
    import torch
    import transformers
    from transformers import GenerationConfig

    from opsd_mm.model.tiny.text import SPECIAL_TOKENS, tiny_corpus, train_tiny_tokenizer

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny VL family '{family}'; choose one of {list(TINY_FAMILIES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_tokenizer(seed)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-len(tok) // 64) * 64
    config = _model_config(family, ids, vocab_size, num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed if weight_seed is None else weight_seed)
        model = getattr(transformers, TINY_FAMILIES[family].model_class)(config).to(torch.float32)
        warm = None
        if warm_steps:
            from opsd_mm.model.tiny.warm import lm_warm_start

            warm = lm_warm_start(model, tok, tiny_corpus(0), warm_steps)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    model.save_pretrained(out_dir)
    _hf_processor(family, tok).save_pretrained(out_dir)
    if warm is not None:
        from opsd_mm.model.tiny.warm import write_info

        write_info(out_dir, {"layers": num_layers, "weight_seed": weight_seed, **warm})
    return out_dir
