"""``rollout.async=true`` against a real `opsd-mm serve` (this, the vLLM environment), the
trainer in the MAIN environment: every batch after the first is exactly one step stale, the
importance weights come from the server's log-probs, two runs with one seed give the same
losses, and a run stopped by SIGTERM resumes to the uninterrupted run's losses, step for step
(the checkpoint records the batch generated ahead)."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest

from opsd_mm.testing.server import ServerProcess
from opsd_mm.train.metrics import read_metrics

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

STEPS = 5
ASYNC = (
    "rollout.async=true",
    "loss.importance_clip=2.0",
    f"trainer.max_steps={STEPS}",
    "trainer.save_every=2",
    "trainer.lr=1.0e-2",  # large enough that one step moves the log-probs measurably
)


@pytest.fixture(scope="module")
def reference(server, tiny_cache, tmp_path_factory, train_via_server):
    """The metrics of an uninterrupted async run."""
    run_dir = tmp_path_factory.mktemp("async-reference")
    run = train_via_server(run_dir, tiny_cache, server.url, *ASYNC)
    assert run.returncode == 0, run.stderr[-3000:]
    return read_metrics(run_dir / "metrics.jsonl")


def test_async_is_one_step_stale_with_server_importance_weights(reference):
    rows = reference
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in rows)
    # Step 1 samples from the weights it trains; every later batch was generated while the
    # previous step trained, from the weights one optimizer step behind.
    assert [r["rollout/staleness_max"] for r in rows] == [0.0] + [1.0] * (STEPS - 1)
    assert [r["rollout/staleness_mean"] for r in rows] == [0.0] + [1.0] * (STEPS - 1)
    # The server's log-probs: equal to the trainer's at step 1, off by the stale step later.
    gaps = [r["rollout/logprob_gap"] for r in rows]
    assert gaps[0] < 1e-4 and min(gaps[1:]) > 1e-3, gaps
    for r in rows:
        assert 0.0 <= r["importance/clip_fraction"] <= 1.0
        assert 0.0 < r["importance/weight_mean"] <= 2.0
        assert math.isfinite(r["importance/ratio_max"])
    assert any(abs(r["importance/weight_mean"] - 1.0) > 1e-4 for r in rows[1:])


def test_async_same_seed_same_losses(server, tiny_cache, tmp_path, reference, train_via_server):
    """Run again with the weights sent over a gloo group instead of files (the reference's):
    the same losses and gaps, bit for bit - the transport changes nothing the server holds."""
    run = train_via_server(
        tmp_path, tiny_cache, server.url, *ASYNC, "rollout.server_transport=gloo"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    again = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["loss"] for r in again] == [r["loss"] for r in reference]
    assert [r["rollout/logprob_gap"] for r in again] == [
        r["rollout/logprob_gap"] for r in reference
    ]


def test_async_sigterm_then_resume_is_exact(
    server, tiny_cache, tmp_path, reference, train_via_server
):
    """SIGTERM after step 1: the run finishes its step, waits for the batch in flight, saves it
    in the checkpoint and exits 143; --resume gives the reference's losses for the rest."""
    run_dir, log = tmp_path / "run", tmp_path / "stopped.log"
    proc = train_via_server(run_dir, tiny_cache, server.url, *ASYNC, log=log)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out waiting for step 1"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, log.read_text()[-3000:]
    stopped = len(read_metrics(metrics))
    assert 1 <= stopped < STEPS, "the signal should land mid-run"
    resumed = train_via_server(run_dir, tiny_cache, server.url, *ASYNC, "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = read_metrics(metrics)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference]
    assert [r["rollout/staleness_max"] for r in rows] == [0.0] + [1.0] * (STEPS - 1)


def test_async_over_gloo_stops_clearly_when_the_server_restarts(
    tiny_text_dir, tiny_cache, tmp_path, train_via_server
):
    """Async with the weights sent over a group. A restart noticed by a generation ahead: the
    weights the new server needs are being trained by then and exist nowhere else, so the run
    stops with a message naming the way out (--resume, or the file transport) instead of
    training on completions from the initial weights. A restart noticed by a sync instead (the
    server was killed while idle, between a generation and the next step's sync) is repaired
    by that sync, which sends the current weights, and the run finishes one step stale
    throughout. Which of the two happens depends on when the kill lands; both are checked."""
    srv = ServerProcess(tiny_text_dir)
    srv.start()
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"
    try:
        proc = train_via_server(
            run_dir,
            tiny_cache,
            srv.url,
            *ASYNC,
            "trainer.max_steps=30",
            "rollout.server_retries=30",
            "rollout.server_transport=gloo",
            log=tmp_path / "log.txt",
        )
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "timed out waiting for step 1"
            time.sleep(0.05)
        srv.stop()
        srv.start()
        code = proc.wait(timeout=300)
    finally:
        srv.stop()
    log = (tmp_path / "log.txt").read_text()
    assert "generation server restarted" in log, log[-3000:]
    rows = read_metrics(metrics)
    if code == 0:
        assert [r["step"] for r in rows] == list(range(1, 31))
        assert [r["rollout/staleness_max"] for r in rows] == [0.0] + [1.0] * 29
        assert "restarted while generating ahead" not in log
    else:
        assert code == 2, log[-3000:]
        assert "restarted while generating ahead (rollout.async)" in log, log[-3000:]
        assert "--resume" in log
        assert len(rows) < 30


@pytest.mark.parametrize(
    "change", ["trainer.batch_size=3", "rollout.n=3"], ids=["batch_size", "rollout_n"]
)
def test_async_resume_with_a_changed_batch_samples_the_ahead_batch_afresh(
    server, tiny_cache, tmp_path, train_via_server, change
):
    """The checkpoint after step 2 holds step 3's batch, generated ahead at the old batch size
    or rollout.n. Resumed with another one, that batch cannot be trained: it is sampled again
    at the new size, with a warning, and the run goes on (it was a RuntimeError traceback)."""
    import shutil

    from opsd_mm.train import checkpoint as ckpt

    run_dir = tmp_path / "run"
    common = ("rollout.async=true", "trainer.save_every=2")
    first = train_via_server(run_dir, tiny_cache, server.url, *common, "trainer.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.rmtree(ckpt.checkpoint_dir(run_dir) / ckpt.step_name(3))  # resume from step 2
    resumed = train_via_server(
        run_dir,
        tiny_cache,
        server.url,
        *common,
        "trainer.max_steps=4",
        "trainer.resume=true",
        change,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "the batch generated ahead for step 3 has 2 prompts x 2 rollouts" in resumed.stderr
    assert "sampling it afresh" in resumed.stderr
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
