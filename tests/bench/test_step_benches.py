"""The step benches' shared pieces: long-tailed lengths, the fixed completions both vs-TRL
contenders train on, the children's command lines, the useful-FLOP count behind the MFU, and
one-step smoke runs of bench/step_throughput.py and bench/vs_trl.py on a tiny shape (slow)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from shapes import lognormal_lengths  # noqa: E402
from vs_trl import Completions, child_argv, draw_completions, parse_args, step_flops  # noqa: E402


def test_lognormal_lengths_long_tailed_and_capped():
    lengths = lognormal_lengths(256, 100, 1.2, 1024, seed=0)
    assert lengths == lognormal_lengths(256, 100, 1.2, 1024, seed=0)
    assert 1 <= min(lengths) and max(lengths) <= 1024
    assert max(lengths) / (sum(lengths) / len(lengths)) >= 4


def test_fixed_completions_are_the_same_however_they_are_taken():
    # TRL takes n rows per generation call (its best settings), ours a whole step's P x n:
    # row k of the run is the same completion either way, its ids from the allowed ones.
    args = argparse.Namespace(steps=2, warmup=1, prompts=3, n=2, mean_len=8, sigma=1.0, max_len=16)
    rows = draw_completions(args, list(range(50, 60)))
    assert len(rows) == 3 * 3 * 2 and rows == draw_completions(args, list(range(50, 60)))
    assert all(1 <= len(r) <= 16 and all(50 <= t < 60 for t in r) for r in rows)
    assert len({len(r) for r in rows}) > 1  # lengths vary (a long tail)
    by_two, by_six = Completions(rows), Completions(rows)
    taken_two = [r for _ in range(9) for r in by_two.take(2)]
    taken_six = [r for _ in range(3) for r in by_six.take(6)]
    assert taken_two == taken_six == rows
    with pytest.raises(RuntimeError, match="left"):
        by_two.take(1)


def test_child_command_passes_each_option_once():
    # --ours used to be passed through twice, its value landing as a stray positional.
    args = parse_args(["--steps", "3", "--ours", "trainer.micro_batch_tokens=256", "loss.beta=0.3"])
    cmd = child_argv(args, "ours", "jsd", "/m", "/c.json")
    assert cmd.count("trainer.micro_batch_tokens=256") == 1 and cmd.count("--ours") == 1
    assert cmd[-3:] == ["--ours", "trainer.micro_batch_tokens=256", "loss.beta=0.3"]
    child = parse_args(cmd[2:])  # what the child parses: no stray positional, same values
    assert child.ours == ["trainer.micro_batch_tokens=256", "loss.beta=0.3"]
    assert (child.steps, child.child, child.completions) == (3, "ours", "/c.json")
    real = parse_args(["--real-shape"])
    assert (real.mean_len, real.max_len, real.prompts) == (512, 2048, 8)


def test_step_flops_counts_by_hand():
    # One layer, hidden 4, 2 heads of 2 (q 4), 1 kv head (kv 2), intermediate 8, vocab 10.
    shape = dict(hidden=4, layers=1, intermediate=8, heads=2, kv_heads=1, head_dim=2, vocab=10)
    params = 4 * 4 + 2 * 4 * 2 + 4 * 4 + 3 * 4 * 8  # q, k+v, o, gate/up/down = 144
    # A row: student prompt 3, teacher prompt 5, completion 2 -> lengths 5 and 7.
    fwd = {length: 2 * length * params + 2 * length**2 * 4 + 2 * 10 * 4 * 2 for length in (5, 7)}
    assert step_flops(shape, [(3, 5, 2)], full_ft=False) == fwd[7] + 2 * fwd[5]
    assert step_flops(shape, [(3, 5, 2)], full_ft=True) == fwd[7] + 3 * fwd[5]
    assert step_flops(shape, [(3, 5, 2)] * 2, full_ft=True) == 2 * (fwd[7] + 3 * fwd[5])


@pytest.mark.slow
def test_step_throughput_runs(tmp_path):
    cmd = [sys.executable, str(BENCH / "step_throughput.py"), "--steps", "1", "--warmup", "0"]
    cmd += ["--hidden", "64", "--layers", "1", "--prompts", "2", "--mean-len", "8"]
    cmd += ["--max-len", "32", "--micro-batch-tokens", "256"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("x\n") == 4  # four contenders with their ratio


@pytest.mark.slow
def test_vs_trl_runs(tmp_path):
    cmd = [sys.executable, str(BENCH / "vs_trl.py"), "--steps", "1", "--warmup", "0"]
    cmd += ["--hidden", "64", "--layers", "1", "--vocab", "0", "--prompts", "2"]
    cmd += ["--mean-len", "8", "--max-len", "16", "--modes", "sampled"]
    cmd += ["--ours", "trainer.micro_batch_tokens=256"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    for who in ("trl", "trl-shipped"):
        assert f"ours / {who}: step tok/s" in out.stdout, out.stdout[-3000:]
    assert "[ours sampled] step 1" in out.stdout  # phases printed as they end
