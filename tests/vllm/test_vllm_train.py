"""`opsd-mm train ... rollout.engine=vllm` end to end in the vLLM environment: finite losses,
and a rollout/trainer log-prob gap near 0 on fp32 tiny models (weights synced every step)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from opsd_mm.cli import main
from opsd_mm.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("config", ["tiny_text.yaml", "tiny_vl.yaml"])
def test_train_with_vllm_engine(config, tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    rc = main(
        [
            "train",
            str(ROOT / "configs" / config),
            "rollout.engine=vllm",
            f"run_dir={tmp_path}",
            "trainer.max_steps=3",
            "trainer.save_every=0",
            f"model.tiny_cache_dir={tiny_cache}",
            "logging.progress=false",
        ]
    )
    assert rc == 0
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    gaps = [r["rollout/logprob_gap"] for r in rows]
    assert all(g is not None and g < 1e-4 for g in gaps), gaps
