"""End-to-end VL training on the tiny models: `opsd-mm train configs/tiny_vl.yaml` per family."""

import math
from pathlib import Path

import pytest
import torch

from opsd_mm.cli import build_trainer, main
from opsd_mm.config import load_config
from opsd_mm.train.metrics import read_metrics

TINY_VL = Path(__file__).resolve().parents[2] / "configs" / "tiny_vl.yaml"
FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_vl_trains_lora_only(family, tiny_cache, tmp_path):
    overrides = [
        f"run_dir={tmp_path}",
        f"model.name_or_path=tiny:{family}",
        f"model.tiny_cache_dir={tiny_cache}",
        "logging.progress=false",
        "trainer.save_every=0",
        "trainer.max_steps=3",
    ]
    trainer = build_trainer(load_config(TINY_VL, overrides))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    history = trainer.train()
    after = dict(trainer.model.named_parameters())
    assert [m["step"] for m in history] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in history)
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all("lora_" in n for n in changed)
    vision = [n for n in before if ".visual." in n]
    assert vision and not changed & set(vision)


def test_cli_train_tiny_vl(tiny_cache, tmp_path):
    rc = main(
        [
            "train",
            str(TINY_VL),
            f"run_dir={tmp_path}",
            "trainer.max_steps=3",
            f"model.tiny_cache_dir={tiny_cache}",
            "logging.progress=false",
        ]
    )
    assert rc == 0
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["bad_examples"] == 0
