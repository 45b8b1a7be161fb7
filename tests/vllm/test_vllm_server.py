"""`opsd-mm serve` (this, the vLLM environment) driven by a trainer-side client in the MAIN
environment (`.venv`, no vLLM), each in its own process, over loopback HTTP: the point of the
server design. Greedy parity with HFEngine before and after a weight sync, a 3-step training
run through the server, a clear error before step 1 when no server answers, and a server killed
and restarted mid-run."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from opsd_mm.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
MAIN_PY = ROOT / ".venv" / "bin" / "python"

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An `opsd-mm serve` subprocess from this (vLLM) environment on 127.0.0.1:port."""

    def __init__(self, model: Path, port: int) -> None:
        self.model, self.port = model, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240.0) -> None:
        cmd = [
            sys.executable,
            "-m",
            "opsd_mm.cli",
            "serve",
            str(self.model),
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()
        )
        deadline = time.monotonic() + timeout
        lines = []
        for line in self.proc.stdout:
            lines.append(line)
            if line.startswith("serving "):
                break
            if time.monotonic() > deadline:
                break
        else:
            raise RuntimeError("server exited:\n" + "".join(lines[-30:]))
        # Keep draining its output so that it never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tiny_text_dir):
    if not MAIN_PY.exists():
        pytest.skip(f"the main environment {MAIN_PY} is missing (make venv)")
    srv = Server(tiny_text_dir, _free_port())
    srv.start()
    yield srv
    srv.stop()


def _train(tmp_path, tiny_cache, url, *extra, timeout=300):
    cmd = [
        str(MAIN_PY),
        "-m",
        "opsd_mm.cli",
        "train",
        str(ROOT / "configs" / "tiny_text.yaml"),
        "rollout.engine=vllm_server",
        f"rollout.server_url={url}",
        f"run_dir={tmp_path}",
        "trainer.max_steps=3",
        "trainer.save_every=0",
        f"model.tiny_cache_dir={tiny_cache}",
        "logging.progress=false",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


def test_server_greedy_parity_and_sync(server, tiny_text_dir, tmp_path):
    script = Path(__file__).with_name("server_parity_client.py")
    run = subprocess.run(
        [str(MAIN_PY), str(script), server.url, str(tiny_text_dir), str(tmp_path / "sync")],
        capture_output=True,
        text=True,
        env=_env(),
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


def test_train_through_server(server, tiny_cache, tmp_path):
    run = _train(tmp_path, tiny_cache, server.url)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    # Weights synced every step, fp32 on both sides: the server samples from the trainer's model.
    gaps = [r["rollout/logprob_gap"] for r in rows]
    assert all(g is not None and g < 1e-4 for g in gaps), gaps


def test_unreachable_server_fails_before_step_1(tiny_cache, tmp_path):
    if not MAIN_PY.exists():
        pytest.skip(f"the main environment {MAIN_PY} is missing")
    url = f"http://127.0.0.1:{_free_port()}"
    run = _train(tmp_path, tiny_cache, url, "rollout.server_retries=0")
    assert run.returncode == 2, run.stderr[-3000:]
    assert "no generation server at " + url in run.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_server_restart_mid_run(tiny_text_dir, tiny_cache, tmp_path):
    """Killed after step 1 and restarted on the same port: the client retries until it answers,
    sees the new boot id, reloads the last synced weights and the run finishes, still on-policy
    (log-prob gap ~0: the restarted server would otherwise sample from the initial weights)."""
    if not MAIN_PY.exists():
        pytest.skip(f"the main environment {MAIN_PY} is missing")
    srv = Server(tiny_text_dir, _free_port())
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
        run = _train(
            tmp_path / "run",
            tiny_cache,
            srv.url,
            "trainer.max_steps=4",
            "rollout.server_retries=30",
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
