"""Rendered samples (``logging.samples_every``): records, per-sample divergence, the trainer."""

import json
import math
from pathlib import Path

import pytest
import torch

from opsd_mm.train.samples import excerpt, per_sample_means, pick_pairs
from opsd_mm.types import Pair, Prompt

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {
    "step",
    "example_id",
    "student_prompt",
    "completion",
    "completion_len",
    "privileged",
    "teacher_prompt",
    "divergence_mean",
}


def _pair(ex_id, n):
    return Pair(ex_id, Prompt([1], text="s"), Prompt([2], text="t"), list(range(n)))


def test_excerpt_keeps_head_and_tail():
    assert excerpt("short", 10) == "short"
    text = "A" * 50 + "B" * 50
    out = excerpt(text, 20)
    assert out.startswith("A" * 10) and out.endswith("B" * 10) and "80 chars" in out


def test_pick_pairs_prefers_distinct_examples():
    pairs = [_pair("a", 2), _pair("a", 2), _pair("b", 2), _pair("b", 2)]
    assert pick_pairs(pairs, 2) == [0, 2]
    assert pick_pairs(pairs, 3) == [0, 2, 1]


def test_per_sample_means_split_by_loss_tokens():
    pairs = [_pair("a", 3), _pair("b", 1), _pair("c", 4)]
    # skip_first_tokens=1: 2, 0 and 3 loss tokens.
    div_N = torch.tensor([1.0, 3.0, 2.0, 4.0, 6.0])
    assert per_sample_means(pairs, div_N, 1) == [2.0, None, 4.0]
    assert per_sample_means(pairs, div_N, 0) == [None, None, None]  # counts do not add up


@pytest.mark.slow
def test_trainer_writes_samples_every_k_steps(tiny_cache, tmp_path, tiny_text_dir):
    from opsd_mm.cli import main

    run = tmp_path / "run"
    rc = main(
        [
            "train",
            str(ROOT / "configs" / "tiny_text.yaml"),
            f"run_dir={run}",
            "trainer.max_steps=3",
            "trainer.save_every=0",
            "logging.samples_every=2",
            "logging.samples_n=2",
            "logging.report_to=[tensorboard]",
            f"model.tiny_cache_dir={tiny_cache}",
            "logging.progress=false",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2]
    for r in rows:
        assert set(r) == FIELDS
        assert r["student_prompt"].startswith("<|im_start|>user")
        assert r["privileged"] and "\\boxed" in r["privileged"]
        assert r["completion_len"] > 0 and isinstance(r["completion"], str)
        assert "Reference Solution" in r["teacher_prompt"]
        assert r["divergence_mean"] is not None and math.isfinite(r["divergence_mean"])
    assert rows[0]["example_id"] != rows[1]["example_id"]
    # The same records reach the tensorboard tracker as text.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in run.rglob("events.out.tfevents*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["tensors"])
    assert {"samples/0/text_summary", "samples/1/text_summary"} <= tags
