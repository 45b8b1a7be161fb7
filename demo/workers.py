"""The demo's work side by side: worker processes, one progress bar.

Why processes: the demo is a set of independent jobs - per task a warm start, then per seed
the OPSD run, the SFT baseline (and with --compare-rewards GRPO and the hybrid), each of which
needs only its task's warm start - and each job runs its torch work on one thread
(``--threads``). On a machine with two or more cores the jobs can run at the same time, so the
demo takes about as long as its longest chain (the vision warm start, then its OPSD run)
instead of the sum. Threads would not do: a tiny model's step is mostly Python (transformers'
module calls, the processors), which holds the GIL.

Workers are ``spawn`` processes (no state inherited from the parent's torch) that take jobs
from one queue and report through another: progress amounts and messages, which the parent
feeds to its bar, then the job's result or its error. The parent hands out a job only when a
worker is free, longest chain first (warm starts, then OPSD runs, vision before text), so the
order does not depend on which worker asks. A worker that dies without reporting (killed, out
of memory) is an error naming its job. Ctrl-C stops the workers (they ignore SIGINT, so that
only the parent reports it). The results are those of running the jobs one after another:
each job seeds itself, and the warm start is written before any job that reads it starts.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def default_jobs(n_jobs: int) -> int:
    """One worker per job that can run at once, up to the cores this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(n_jobs, cores))


class QueueProgress:
    """The worker's side of :class:`opsd_mm.demo.run.Progress`: forwards to the parent."""

    def __init__(self, q: Any) -> None:
        self.q = q

    def add(self, amount: float) -> None:
        self.q.put(("add", amount))

    def write(self, msg: str) -> None:
        self.q.put(("write", msg))


@dataclass(frozen=True)
class Job:
    task: str
    method: str  # "warm" (warm start and its evaluations), or a training run of one seed
    seed: int = 0
    prepared: dict | None = None  # the task's warm-start results, for the training runs

    @property
    def label(self) -> str:
        return f"{self.task} {self.method}" + (
            "" if self.method == "warm" else f" seed {self.seed}"
        )


def _worker(context: tuple, jobs: Any, out: Any) -> None:
    """Run jobs until a None arrives; report ("done", label, result) or ("error", label, text)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from opsd_mm.demo.run import prepare_task, quiet, run_method, setup_task

    plans, args, run_dir, wiring = context
    quiet(args.threads)
    progress = QueueProgress(out)
    setups: dict[str, Any] = {}
    while (job := jobs.get()) is not None:
        try:
            if job.task not in setups:
                setups[job.task] = setup_task(
                    job.task, plans[job.task], args, run_dir, wiring, progress
                )
            setup = setups[job.task]
            if job.method == "warm":
                result = prepare_task(setup, args, progress)
            else:
                result = run_method(setup, job.prepared, job.seed, job.method, progress)
        except BaseException as e:  # reported to the parent, which raises it
            out.put(("error", job.label, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
            raise SystemExit(1) from None
        out.put(("done", job.label, result))


class TaskFailed(RuntimeError):
    """A job's worker process raised or died."""


def run_parallel(
    plans: dict[str, Any],
    args: argparse.Namespace,
    seeds: list[int],
    run_dir: Path,
    wiring: Any,
    progress: Any,
    n_workers: int,
    methods: list[str],
    work: dict[str, float],
) -> dict[str, dict]:
    """Every task's warm start, then its ``methods`` for every seed, in ``n_workers``
    processes. ``work``: each task's estimated seconds, to start the longest first. Returns
    ``{task: (prepared, {seed: {method: result}}, wall_s)}`` in ``plans``' order."""
    from opsd_mm.demo.run import seed_line

    ctx = mp.get_context("spawn")
    job_q, out_q = ctx.Queue(), ctx.Queue()
    by_length = sorted(plans, key=lambda t: -work[t])
    ready: list[Job] = [Job(t, "warm") for t in by_length]
    running: dict[str, Job] = {}  # label -> job
    prepared: dict[str, dict] = {}
    runs: dict[str, dict[int, dict]] = {t: {s: {} for s in seeds} for t in plans}
    started: dict[str, float] = {}
    finished: dict[str, float] = {}
    total = len(plans) * (1 + len(seeds) * len(methods))
    done = 0

    def finish(job: Job, result: Any) -> None:
        nonlocal done
        done += 1
        if job.method == "warm":
            prepared[job.task] = result
            rank = {m: i for i, m in enumerate(methods)}
            new = [Job(job.task, m, s, result) for s in seeds for m in methods]
            ready.extend(sorted(new, key=lambda j: (rank[j.method], j.seed)))
            ready.sort(key=lambda j: (j.method != "warm", j.method != "opsd", -work[j.task]))
            return
        per_seed = runs[job.task][job.seed]
        per_seed[job.method] = result
        if len(per_seed) == len(methods):
            progress.write(seed_line(job.task, prepared[job.task], job.seed, per_seed))
        if all(len(v) == len(methods) for v in runs[job.task].values()):
            finished[job.task] = time.perf_counter()

    def handle(msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            progress.add(msg[1])
        elif kind == "write":
            progress.write(msg[1])
        elif kind == "done":
            finish(running.pop(msg[1]), msg[2])
        else:  # "error"
            raise TaskFailed(f"demo job '{msg[1]}' failed: {msg[2]}")

    context = (plans, args, run_dir, wiring)
    workers = [
        ctx.Process(target=_worker, args=(context, job_q, out_q), name=f"demo-worker-{i}")
        for i in range(n_workers)
    ]
    for w in workers:
        w.start()
    try:
        while done < total:
            while ready and len(running) < n_workers:
                job = ready.pop(0)
                started.setdefault(job.task, time.perf_counter())
                running[job.label] = job
                job_q.put(job)
            try:
                handle(out_q.get(timeout=0.5))
                continue
            except queue.Empty:
                pass
            if any(w.exitcode is not None for w in workers):
                try:  # read what a worker sent before it exited
                    while True:
                        handle(out_q.get(timeout=2.0))
                except queue.Empty:
                    pass
                dead = [w for w in workers if w.exitcode is not None]
                if dead and done < total:
                    raise TaskFailed(
                        f"a demo worker exited with code {dead[0].exitcode} while running "
                        f"{', '.join(running) or 'no job'}"
                    )
        for _ in workers:
            job_q.put(None)
        for w in workers:
            w.join()
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join()
    return {t: (prepared[t], runs[t], finished[t] - started[t]) for t in plans}
