"""End to end: the tiny VL / text model trains 2 steps on a local copy of each real schema with
``data.preset=X data.source=PATH`` and no other data key (the rest is test plumbing: run dir,
tiny-model cache, step count)."""

import math
from pathlib import Path

import pytest

from opsd_mm.cli import main
from opsd_mm.config import load_config
from opsd_mm.train.metrics import read_metrics
from tests.fixtures.schemas import write_copy

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# Every preset once, the three formats spread over them (all formats load in test_presets.py).
CASES = [
    ("wemath2_standard", "disk"),
    ("wemath2_pro", "parquet"),
    ("wemath2_sft", "jsonl"),
    ("mathvision", "jsonl"),
    ("mmfinereason", "parquet"),
    ("virl39k", "parquet"),  # image paths inside the parquet, resolved against its directory
    ("messages", "disk"),
    ("opsd_math", "jsonl"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "fmt"), CASES)
def test_tiny_model_trains_on_preset(preset, fmt, tiny_cache, tmp_path):
    source = write_copy(preset, tmp_path / "data", fmt)
    config = CONFIGS / ("tiny_text.yaml" if preset == "opsd_math" else "tiny_vl.yaml")
    run = tmp_path / "run"
    argv = [
        "train",
        str(config),
        f"data.preset={preset}",
        f"data.source={source}",
        f"run_dir={run}",
        f"model.tiny_cache_dir={tiny_cache}",
        "trainer.max_steps=2",
        "trainer.save_every=0",
        "logging.progress=false",
    ]
    assert main(argv) == 0
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    saved = load_config(run / "config.yaml")  # the resolved preset is what the run records
    assert saved.data.split and saved.processor.teacher_template
