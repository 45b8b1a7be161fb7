"""Crash safety of sharded (FSDP2) checkpoints, 2 processes over gloo on the CPU.

- ``kill -9`` of both processes while they write a sharded checkpoint (each has written its
  ``.distcp`` shard, the rename has not happened): ``--resume`` picks the previous complete
  checkpoint and the following losses equal an uninterrupted 2-process run's exactly.
- A damaged newest sharded checkpoint (a truncated shard file, a garbled ``state.json``, a
  garbled DCP ``.metadata``) is skipped for the previous complete one, with a warning naming
  both, and renamed ``corrupt-step-*``; the run then continues exactly.

The processes are started here directly (``RANK`` / ``WORLD_SIZE`` / ``MASTER_*``, what
``torchrun`` sets) rather than under ``torchrun``, whose workers live in their own sessions: so
the test holds each process's pid and SIGKILLs exactly those. Full fine-tuning with an EMA
teacher, so the sharded checkpoint holds parameters, AdamW state and teacher tensors.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from opsd_mm.train import checkpoint as ckpt
from opsd_mm.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
RUN_TINY = ROOT / "tests" / "dist" / "run_tiny.py"
MAX_STEPS = 4
NPROC = 2


def _args(tiny_cache, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--fsdp2",
        f"model.tiny_cache_dir={tiny_cache}",
        f"run_dir={run_dir}",
        "model.lora.enabled=false",
        "teacher.kind=ema",
        "teacher.ema_decay=0.5",
        "trainer.batch_size=2",
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.save_every=1",
        f"trainer.keep_last={MAX_STEPS}",
        "rollout.max_new_tokens=8",
        *extra,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, args: list[str], env_extra: dict[str, str] | None = None):
    """Start NPROC processes of run_tiny.py; each logs to ``out/log{rank}.txt`` (a file, so a
    full pipe never blocks a process)."""
    out.mkdir(parents=True, exist_ok=True)
    port = str(_free_port())
    procs = []
    for rank in range(NPROC):
        env = {
            **os.environ,
            **(env_extra or {}),
            "ACCELERATE_USE_CPU": "true",
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "WORLD_SIZE": str(NPROC),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(NPROC),
        }
        with (out / f"log{rank}.txt").open("w") as log:
            cmd = [sys.executable, str(RUN_TINY), str(out), *args]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _logs(out: Path) -> str:
    return "".join((out / f"log{r}.txt").read_text() for r in range(NPROC))


def _run(out: Path, args: list[str]) -> tuple[list[dict], str]:
    """Run to completion; each process's dump and both logs."""
    procs = _start(out, args)
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * NPROC, _logs(out)[-6000:]
    dumps = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(NPROC)]
    return dumps, _logs(out)


def _losses(dumps: list[dict]) -> list[float]:
    r0, r1 = dumps
    assert [m["loss"] for m in r0["metrics"]] == [m["loss"] for m in r1["metrics"]]
    return [m["loss"] for m in r0["metrics"]]


@pytest.fixture(scope="module")
def uninterrupted(tiny_cache, tiny_text_dir, tmp_path_factory):
    """An uninterrupted 2-process run that checkpoints every step: (its run dir, losses)."""
    tmp = tmp_path_factory.mktemp("sharded-uninterrupted")
    dumps, _ = _run(tmp / "out", _args(tiny_cache, tmp / "run"))
    losses = _losses(dumps)
    assert len(losses) == MAX_STEPS
    saved = ckpt.list_checkpoints(tmp / "run")
    assert len(saved) == MAX_STEPS and all(ckpt.is_sharded(p) for p in saved)
    return tmp / "run", losses


def _resume_and_check(tiny_cache, run: Path, out: Path, losses: list[float], from_step: int):
    """Resume on 2 processes: the remaining steps' losses exactly; metrics.jsonl whole."""
    dumps, log = _run(out, _args(tiny_cache, run, "trainer.resume=true"))
    assert [m["step"] for m in dumps[0]["metrics"]] == list(range(from_step + 1, MAX_STEPS + 1))
    assert _losses(dumps) == losses[from_step:]  # exactly (same layout, CPU, fp32)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    assert not list(ckpt.checkpoint_dir(run).glob(".tmp-*"))
    return log


@pytest.mark.slow
def test_kill_during_sharded_checkpoint_write_then_resume(tiny_cache, uninterrupted, tmp_path):
    _, losses = uninterrupted
    run = tmp_path / "run"
    # Both processes stop inside the save of step 3, once their shards are written.
    procs = _start(tmp_path / "killed", _args(tiny_cache, run), {ckpt.STALL_ENV: "3"})
    partial = ckpt.checkpoint_dir(run) / ".tmp-step-000003-sharded"
    deadline = time.monotonic() + 300
    while not (partial / ckpt.SHARDED_DIR / ".metadata").exists():
        assert all(p.poll() is None for p in procs), _logs(tmp_path / "killed")[-3000:]
        assert time.monotonic() < deadline, "timed out waiting for the sharded save"
        time.sleep(0.05)
    time.sleep(0.5)  # .metadata is written last by DCP; both processes are now stalled
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait(timeout=30)
        assert p.returncode == -signal.SIGKILL
    assert len(list((partial / ckpt.SHARDED_DIR).glob("*.distcp"))) == NPROC
    assert not (partial / "state.json").exists()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000001", "step-000002"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    _resume_and_check(tiny_cache, run, tmp_path / "resumed", losses, 2)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["distcp", "state_json", "metadata"])
def test_corrupt_newest_sharded_checkpoint_falls_back(damage, tiny_cache, uninterrupted, tmp_path):
    src, losses = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(src, run)
    newest = ckpt.latest_checkpoint(run)
    assert newest.name == f"step-{MAX_STEPS:06d}"
    if damage == "distcp":
        shard = sorted((newest / ckpt.SHARDED_DIR).glob("*.distcp"))[-1]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # truncated
    elif damage == "state_json":
        (newest / "state.json").write_text('{"step": 4, "data": {')
    else:
        (newest / ckpt.SHARDED_DIR / ".metadata").write_bytes(b"not a pickle")
    log = _resume_and_check(tiny_cache, run, tmp_path / "resumed", losses, MAX_STEPS - 1)
    assert f"{newest} cannot be loaded" in log
    assert f"previous complete checkpoint {run / 'checkpoints' / 'step-000003'}" in log
    assert (ckpt.checkpoint_dir(run) / f"corrupt-{newest.name}").is_dir()
