"""kill -9 a real training process, then resume: the latest complete checkpoint is picked (never
a half-written one) and the following losses equal an uninterrupted run's exactly (CPU, fp32,
same seed). The killed run is a subprocess (tests/dist/run_tiny.py, or ``opsd-mm train`` for the
signal tests); the uninterrupted reference and the resumed runs run in this process.

Also: a fresh run with --overwrite into a used run_dir, killed and resumed, stays apart from the
old run; SIGTERM/SIGINT finish the step, write a checkpoint and exit 143/130, and --resume then
gives the uninterrupted losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opsd_mm.cli import build_trainer
from opsd_mm.config import load_config
from opsd_mm.train import checkpoint as ckpt
from opsd_mm.train import run_dir as rundir
from opsd_mm.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_text.yaml"
RUN_TINY = ROOT / "tests" / "dist" / "run_tiny.py"
MAX_STEPS = 5


def _overrides(tiny_cache, run_dir, *extra):
    return [
        f"run_dir={run_dir}",
        f"model.tiny_cache_dir={tiny_cache}",
        "logging.progress=false",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.save_every=1",
        "trainer.keep_last=2",
        "rollout.max_new_tokens=8",
        *extra,
    ]


def _train(tiny_cache, run_dir, *extra) -> list[float]:
    cfg = load_config(TINY, _overrides(tiny_cache, run_dir, *extra))
    return [m["loss"] for m in build_trainer(cfg).train()]


@pytest.fixture(scope="module")
def uninterrupted(tiny_cache, tiny_text_dir, tmp_path_factory):
    """Losses of steps 1..MAX_STEPS, saving every step as the killed runs do."""
    return _train(tiny_cache, tmp_path_factory.mktemp("uninterrupted"))


def _start(tiny_cache, run_dir: Path, env_extra=None, *extra, cli=False) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    overrides = _overrides(tiny_cache, run_dir, *extra)
    if cli:  # the real command line (exit codes)
        args = [sys.executable, "-m", "opsd_mm.cli", "train", str(TINY), *overrides]
    else:
        args = [sys.executable, str(RUN_TINY), str(run_dir.parent / "out"), *overrides]
    log_path = run_dir.parent / "killed.log"  # a file, so a full pipe never blocks the run
    with log_path.open("w") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log_path
    return proc


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            log = proc.log_path.read_text()[-3000:]
            raise AssertionError(f"run ended early ({proc.returncode}): {log}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


def _kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _resume_and_check(tiny_cache, run_dir, uninterrupted, from_step: int) -> None:
    rest = _train(tiny_cache, run_dir, "trainer.resume=true")
    assert rest == uninterrupted[from_step:]  # exactly
    # metrics.jsonl: rows the killed run logged after its last checkpoint were dropped.
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(
        range(1, MAX_STEPS + 1)
    )
    assert not list(ckpt.checkpoint_dir(run_dir).glob(".tmp-*"))


def _rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.slow
def test_kill_during_training_then_resume(tiny_cache, tiny_text_dir, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    # Killed once step 2 is logged. The stall at step 4's save is only a backstop, so that a
    # slow poll cannot let the run finish before the kill.
    proc = _start(tiny_cache, run_dir, {ckpt.STALL_ENV: "4"})
    _wait_for(proc, lambda: _rows(run_dir) >= 2)
    _kill9(proc)
    last = ckpt.latest_checkpoint(run_dir)
    assert last is not None
    step = int(last.name.removeprefix(ckpt.STEP_PREFIX))
    assert 1 <= step < MAX_STEPS, "the kill should land mid-run"
    _resume_and_check(tiny_cache, run_dir, uninterrupted, step)


@pytest.mark.slow
def test_kill_during_checkpoint_write_then_resume(
    tiny_cache, tiny_text_dir, tmp_path, uninterrupted
):
    run_dir = tmp_path / "run"
    proc = _start(tiny_cache, run_dir, {ckpt.STALL_ENV: "3"})  # stalls mid-save of step 3
    root = ckpt.checkpoint_dir(run_dir)
    _wait_for(proc, lambda: any(root.glob(".tmp-step-000003-*/optimizer.pt")))
    _kill9(proc)
    (partial,) = root.glob(".tmp-step-000003-*")
    assert (partial / "model").is_dir() and not (partial / "state.json").exists()
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-000001", "step-000002"]
    assert ckpt.latest_checkpoint(run_dir).name == "step-000002"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
    _resume_and_check(tiny_cache, run_dir, uninterrupted, 2)


@pytest.mark.slow
def test_overwrite_used_run_dir_then_kill_then_resume_keeps_runs_apart(
    tiny_cache, tiny_text_dir, tmp_path, uninterrupted
):
    """An older run (another seed) fills run_dir; a new run with --overwrite is killed -9; its
    --resume continues the new run (its losses, not the old weights'), and metrics.jsonl holds
    the new run's rows only. The old run survives whole in run_dir.replaced-*."""
    run_dir = tmp_path / "run"
    old_losses = _train(tiny_cache, run_dir, "seed=1")
    assert old_losses != uninterrupted
    old_id = rundir.read_run_id(run_dir)
    proc = _start(tiny_cache, run_dir, {ckpt.STALL_ENV: "4"}, "trainer.overwrite=true")
    _wait_for(
        proc, lambda: rundir.read_run_id(run_dir) not in (None, old_id) and _rows(run_dir) >= 2
    )
    _kill9(proc)
    step = int(ckpt.latest_checkpoint(run_dir).name.removeprefix(ckpt.STEP_PREFIX))
    assert 1 <= step < MAX_STEPS
    _resume_and_check(tiny_cache, run_dir, uninterrupted, step)
    logged = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert logged == uninterrupted  # the new run's rows only, exactly
    (old,) = tmp_path.glob("run.replaced-*")
    assert [r["loss"] for r in read_metrics(old / "metrics.jsonl")] == old_losses
    assert rundir.read_run_id(old) == old_id
    assert [p.name for p in ckpt.list_checkpoints(old)] == ["step-000004", "step-000005"]


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signal_checkpoints_then_resume_is_exact(
    tiny_cache, tiny_text_dir, tmp_path, uninterrupted, sig, code
):
    """``opsd-mm train`` without periodic checkpoints gets SIGTERM (preemption) or SIGINT
    (Ctrl-C) mid-run: it finishes the step, writes a checkpoint, exits 128 + signal; --resume
    then gives the uninterrupted run's losses, step for step."""
    run_dir = tmp_path / "run"
    proc = _start(tiny_cache, run_dir, None, "trainer.save_every=0", cli=True)
    _wait_for(proc, lambda: _rows(run_dir) >= 1)
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=120) == code, proc.log_path.read_text()[-3000:]
    log = proc.log_path.read_text()
    assert "Traceback" not in log
    assert f"interrupted: {sig.name}: stopped after step" in log
    step = int(ckpt.latest_checkpoint(run_dir).name.removeprefix(ckpt.STEP_PREFIX))
    assert 1 <= step < MAX_STEPS, "the signal should land mid-run"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, step + 1))
    _resume_and_check(tiny_cache, run_dir, uninterrupted, step)
