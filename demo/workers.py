"""The demo's tasks side by side: one process per task, one progress bar.

Why processes: the text and the vision task share nothing (data, model, warm start), and each
runs its torch work on one thread (``--threads``), so on a machine with two or more cores they
can run at the same time and the demo takes about as long as its longer task instead of their
sum. Threads would not do: a tiny model's step is mostly Python (transformers' module calls,
the processors), which holds the GIL.

Each worker runs :func:`opsd_mm.demo.run.run_task` in a fresh ``spawn`` process (no state is
inherited from the parent's torch) and reports through one queue: progress amounts and
messages, which the parent feeds to its bar, then the task's result or its error. A worker
that dies without reporting (killed, out of memory) is an error naming the task. Ctrl-C stops
the workers (they ignore SIGINT themselves, so that only the parent reports it).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import signal
import traceback
from pathlib import Path
from typing import Any


def default_jobs(n_tasks: int) -> int:
    """One process per task, up to the cores this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(n_tasks, cores))


class QueueProgress:
    """The worker's side of :class:`opsd_mm.demo.run.Progress`: forwards to the parent."""

    def __init__(self, q: Any) -> None:
        self.q = q

    def add(self, amount: float) -> None:
        self.q.put(("add", amount))

    def write(self, msg: str) -> None:
        self.q.put(("write", msg))


def _worker(name: str, payload: tuple, q: Any) -> None:
    """Run one task in this process and put ("done", name, result) or ("error", name, text)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from opsd_mm.demo.run import quiet, run_task

    plan, args, seeds, run_dir, wiring = payload
    try:
        quiet(args.threads)
        result = run_task(name, plan, args, seeds, run_dir, wiring, QueueProgress(q))
    except BaseException as e:  # reported to the parent, which raises it
        q.put(("error", name, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None
    q.put(("done", name, result))


class TaskFailed(RuntimeError):
    """A task's worker process raised or died."""


def run_parallel(
    plans: dict[str, Any],
    args: argparse.Namespace,
    seeds: list[int],
    run_dir: Path,
    wiring: Any,
    progress: Any,
    jobs: int,
) -> dict[str, dict]:
    """Run the tasks of ``plans`` in up to ``jobs`` processes; results in ``plans``' order."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    pending = list(plans)
    running: dict[str, Any] = {}
    results: dict[str, dict] = {}

    def handle(msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            progress.add(msg[1])
        elif kind == "write":
            progress.write(msg[1])
        elif kind == "done":
            results[msg[1]] = msg[2]
            running.pop(msg[1]).join()
        else:  # "error"
            raise TaskFailed(f"demo task '{msg[1]}' failed: {msg[2]}")

    try:
        while pending or running:
            while pending and len(running) < jobs:
                name = pending.pop(0)
                payload = (plans[name], args, seeds, run_dir, wiring)
                proc = ctx.Process(target=_worker, args=(name, payload, q), name=f"demo-{name}")
                proc.start()
                running[name] = proc
            try:
                handle(q.get(timeout=0.5))
                continue
            except queue.Empty:
                pass
            exited = [name for name, proc in running.items() if proc.exitcode is not None]
            if exited:  # read what they sent before exiting, then any silent exit is an error
                try:
                    while True:
                        handle(q.get(timeout=2.0))
                except queue.Empty:
                    pass
                for name in exited:
                    if name in running:
                        raise TaskFailed(
                            f"demo task '{name}': its process exited with code "
                            f"{running[name].exitcode} without a result"
                        )
    finally:
        for proc in running.values():
            if proc.is_alive():
                proc.terminate()
            proc.join()
    return {name: results[name] for name in plans}
