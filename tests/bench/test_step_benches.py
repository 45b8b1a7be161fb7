"""The step benches' shared pieces: long-tailed lengths, completions cut to them, and a
one-step smoke run of bench/step_throughput.py on a tiny shape (slow)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from shapes import lognormal_lengths  # noqa: E402
from vs_trl import Cutter  # noqa: E402


def test_lognormal_lengths_long_tailed_and_capped():
    lengths = lognormal_lengths(256, 100, 1.2, 1024, seed=0)
    assert lengths == lognormal_lengths(256, 100, 1.2, 1024, seed=0)
    assert 1 <= min(lengths) and max(lengths) <= 1024
    assert max(lengths) / (sum(lengths) / len(lengths)) >= 4


def test_cutter_same_lengths_and_ids_in_tokenizer():
    args = argparse.Namespace(mean_len=8, sigma=1.0, max_len=16)
    a, b = Cutter(args, list(range(50, 60)), 100), Cutter(args, list(range(50, 60)), 100)
    raw = [[5000] * 3, list(range(50, 70)), [55] * 16]
    got_a, got_b = a.cut(raw), b.cut([r[:2] for r in raw])
    assert [len(x) for x in got_a] == [len(x) for x in got_b]  # lengths come from the draw
    assert all(50 <= t < 60 for row in got_a + got_b for t in row)


@pytest.mark.slow
def test_step_throughput_runs(tmp_path):
    cmd = [sys.executable, str(BENCH / "step_throughput.py"), "--steps", "1", "--warmup", "0"]
    cmd += ["--hidden", "64", "--layers", "1", "--prompts", "2", "--mean-len", "8"]
    cmd += ["--max-len", "32", "--micro-batch-tokens", "256"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("x\n") == 4  # four contenders with their ratio
