"""`opsd-mm serve` (this, the vLLM environment) driven by a trainer-side client in the MAIN
environment (`.venv`, no vLLM), each in its own process, over loopback HTTP: the point of the
server design. Greedy parity with HFEngine before and after a weight sync, a 3-step training
run through the server, a clear error before step 1 when no server answers, and a server killed
and restarted mid-run."""

from __future__ import annotations

import json
import math
import subprocess
import threading
import time
from pathlib import Path

import pytest

from opsd_mm.testing.server import ServerProcess, free_port, server_env
from opsd_mm.train.metrics import read_metrics

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.mark.parametrize("transport", ["file", "gloo"])
def test_server_greedy_parity_and_sync(server, tiny_text_dir, tmp_path, main_python, transport):
    script = Path(__file__).with_name("server_parity_client.py")
    sync_dir = tmp_path / "sync"
    run = subprocess.run(
        [str(main_python), str(script), server.url, str(tiny_text_dir), str(sync_dir), transport],
        capture_output=True,
        text=True,
        env=server_env(),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    print(out)
    for key in (
        "greedy_parity",
        "sampled_repeatable",
        "stale_unchanged",
        "after_sync_parity",
        "after_sync_moved",
    ):
        assert out[key], (key, out)
    # Over a group nothing is written; the bytes sent are the model's either way.
    assert sync_dir.exists() == (transport == "file")
    assert out["sync_bytes"] > 0


def test_train_through_server(server, tiny_cache, tmp_path, train_via_server):
    """`opsd-mm train ... rollout.engine=vllm_server loss.importance_clip=2.0` for 3 steps: the
    importance weights come from the server's log-probs, synced every step (so they are ~1)."""
    run = train_via_server(tmp_path, tiny_cache, server.url, "loss.importance_clip=2.0")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    # Weights synced every step, fp32 on both sides: the server samples from the trainer's model.
    gaps = [r["rollout/logprob_gap"] for r in rows]
    assert all(g is not None and g < 1e-4 for g in gaps), gaps
    for r in rows:
        assert r["importance/clip_fraction"] == 0.0, r
        assert abs(r["importance/weight_mean"] - 1.0) < 1e-3, r
        assert 1.0 <= r["importance/ratio_max"] < 1.01, r
    assert (tmp_path / "config.yaml").read_text().count("async: false") == 1


def test_train_through_server_over_gloo(server, tiny_cache, tmp_path, train_via_server):
    """The same 3 steps with the weights broadcast over a gloo group instead of files: still
    on-policy after every sync (log-prob gap ~0), and no weight files in the run directory."""
    run = train_via_server(tmp_path, tiny_cache, server.url, "rollout.server_transport=gloo")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    gaps = [r["rollout/logprob_gap"] for r in rows]
    assert all(g is not None and g < 1e-4 for g in gaps), gaps
    assert not (tmp_path / "engine_weights").exists()


def test_unreachable_server_fails_before_step_1(tiny_cache, tmp_path, train_via_server):
    url = f"http://127.0.0.1:{free_port()}"
    run = train_via_server(tmp_path, tiny_cache, url, "rollout.server_retries=0")
    assert run.returncode == 2, run.stderr[-3000:]
    assert "no generation server at " + url in run.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("transport", ["file", "gloo"])
def test_server_restart_mid_run(tiny_text_dir, tiny_cache, tmp_path, train_via_server, transport):
    """Killed after step 1 and restarted on the same port: the client retries until it answers,
    sees the new boot id, makes it hold the last synced weights again (files: reloaded; gloo:
    the group re-formed and the weights sent again) and the run finishes, still on-policy
    (log-prob gap ~0: the restarted server would otherwise sample from the initial weights)."""
    srv = ServerProcess(tiny_text_dir)
    srv.start()
    metrics = tmp_path / "run" / "metrics.jsonl"

    def restart_after_step_1():
        while not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.2)
        srv.stop()
        srv.start()

    restarter = threading.Thread(target=restart_after_step_1, daemon=True)
    restarter.start()
    try:
        run = train_via_server(
            tmp_path / "run",
            tiny_cache,
            srv.url,
            "trainer.max_steps=4",
            "rollout.server_retries=30",
            f"rollout.server_transport={transport}",
            timeout=600,
        )
        restarter.join(timeout=300)
    finally:
        srv.stop()
    assert run.returncode == 0, run.stderr[-3000:]
    assert "generation server restarted" in run.stderr
    rows = read_metrics(metrics)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    gaps = [r["rollout/logprob_gap"] for r in rows]
    assert all(g is not None and g < 1e-4 for g in gaps), gaps


@pytest.mark.parametrize("transport", ["file", "gloo"])
def test_fsdp2_trainer_syncs_through_server(server, tiny_cache, tmp_path, main_python, transport):
    """Two FSDP2 trainer processes (CPU, gloo; tests/dist/run_tiny.py) generating through one
    server. A sync gathers the sharded weights, which is collective: every process gathers,
    the main one alone sends. Both processes stay on-policy (log-prob gap ~0) for 2 steps."""
    root = Path(__file__).resolve().parents[2]
    cmd = [
        *(str(main_python), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
        str(root / "tests" / "dist" / "run_tiny.py"),
        str(tmp_path / "out"),
        "--fsdp2",
        f"model.tiny_cache_dir={tiny_cache}",
        "model.lora.enabled=false",
        "rollout.engine=vllm_server",
        f"rollout.server_url={server.url}",
        f"rollout.server_transport={transport}",
        "trainer.max_steps=2",
        "trainer.batch_size=2",
        "trainer.save_every=0",
        f"run_dir={tmp_path / 'run'}",
    ]
    env = {**server_env(), "ACCELERATE_USE_CPU": "true"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    import torch

    for rank in (0, 1):
        out = torch.load(tmp_path / "out" / f"rank{rank}.pt", weights_only=False)
        assert out["model_class"].startswith("FSDP")
        gaps = [m["rollout/logprob_gap"] for m in out["metrics"]]
        assert len(gaps) == 2 and all(g is not None and g < 1e-4 for g in gaps), (rank, gaps)


def test_weight_sync_bench_runs(main_python, tmp_path):
    """bench/weight_sync.py end to end at a tiny size: both transports sync, and the server's
    greedy completion equals the trainer's after them (the bench's own parity column)."""
    import sys

    root = Path(__file__).resolve().parents[2]
    cmd = [
        *(str(main_python), str(root / "bench" / "weight_sync.py")),
        *("--hidden", "128", "--layers", "2", "--repeats", "1"),
        *("--server-python", sys.executable, "--sync-dir", str(tmp_path / "sync")),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, env=server_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in run.stdout.splitlines() if line}
    for transport in ("file", "gloo"):
        assert rows[transport][5] == "True", run.stdout  # greedy==HF
        assert float(rows[transport][2]) > 0  # s/GB
