"""vLLM loads what `opsd-mm export` writes: a tiny LoRA run (2 steps), exported with the adapter
merged, generates greedily in vLLM exactly as the exported model does in transformers, and
vLLM's tokenizer (read from the export directory) tokenises as the exported tokenizer does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opsd_mm.cli import build_trainer, main
from opsd_mm.config import RolloutConfig, load_config
from opsd_mm.rollout.hf import HFEngine
from opsd_mm.testing.greedy import greedy_mismatch
from opsd_mm.train import checkpoint as ckpt
from opsd_mm.types import SamplingConfig

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_text.yaml"
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=24)


@pytest.fixture(scope="module")
def exported(tiny_cache, tiny_text_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    overrides = [
        f"run_dir={tmp / 'run'}",
        f"model.tiny_cache_dir={tiny_cache}",
        "logging.progress=false",
        "trainer.max_steps=2",
        "trainer.save_every=1",
        "rollout.max_new_tokens=8",
    ]
    build_trainer(load_config(TINY, overrides)).train()
    out = tmp / "model"
    assert main(["export", str(ckpt.latest_checkpoint(tmp / "run")), "--out", str(out)]) == 0
    return out


def test_vllm_loads_the_export_and_matches_transformers(exported, text_setup, text_prompts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opsd_mm.rollout.vllm_engine import VLLMEngine

    _, proc, _ = text_setup
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    engine = VLLMEngine(
        str(exported),
        RolloutConfig(engine="vllm"),
        dtype="float32",
        seed=0,
        max_model_len=512,
        suppress_token_ids=proc.suppress_token_ids,
        eos_token_ids=proc.eos_token_ids,
    )
    try:
        got = engine.generate(text_prompts, 1, GREEDY)
        text = "Compute 12 - 5 + 7 - 2, step by step."
        vllm_ids = engine.llm.get_tokenizer().encode(text)
    finally:
        engine.close()
    want = HFEngine.for_processor(model, proc).generate(text_prompts, 1, GREEDY)
    assert greedy_mismatch(model, text_prompts, got, want) is None
    assert sum(len(rs[0].completion_ids) for rs in got) > 2 * len(text_prompts)
    assert vllm_ids == AutoTokenizer.from_pretrained(exported).encode(text)
