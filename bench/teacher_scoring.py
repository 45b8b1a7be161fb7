"""The live teacher in the trainer against the live teacher scored by the generation server.

Run from the main environment, with the vLLM environment beside it (``make venv venv-vllm``):

    .venv/bin/python bench/teacher_scoring.py

One ``opsd-mm serve`` (the vLLM environment, pinned to ``--server-core``) serves every run; the
``opsd-mm train configs/tiny_text.yaml rollout.engine=vllm_server teacher.kind=live`` runs are
pinned to ``--trainer-core``, one thread each, alternating ``teacher.scoring=local`` and
``teacher.scoring=server`` for ``--repeats`` rounds with the same seed (so the same rollouts).
Printed per mode (steps 2..N, medians over the repeats of each run's mean): the step time and
its phases, where ``teacher`` is the local teacher forward and ``teacher_score`` the server
request that replaces it, and the final losses of both modes side by side.

What it measures is the trade on this machine: the server's forward runs on another core (or
device), the trainer's teacher forward disappears, and the request costs its HTTP round trip,
JSON of the scores and the server's prefill of the teacher prompts. The model is the tiny
random one: the figures are overhead-bound, not a prediction for a real model.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from opsd_mm.model.tiny import resolve_tiny
from opsd_mm.testing.server import ServerProcess, train_through_server

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PHASES = ("teacher", "teacher_score", "student", "optimizer")
LOSSES = {
    "sampled_pg": ["loss.divergence=sampled_pg"],
    "jsd_top8": ["loss.divergence=jsd", "loss.top_k=8"],
}


def _run(args: argparse.Namespace, url: str, run_dir: Path, scoring: str) -> list[dict]:
    overrides = [
        "teacher.kind=live",
        f"teacher.scoring={scoring}",
        "loss.temperature=1.0",
        *LOSSES[args.loss],
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"rollout.n={args.n}",
        f"trainer.batch_size={args.batch_size}",
        f"trainer.micro_batch_size={args.batch_size * args.n}",
        f"trainer.max_steps={args.steps}",
        "trainer.save_every=0",
    ]
    return train_through_server(
        ROOT / "configs" / "tiny_text.yaml",
        url,
        run_dir,
        overrides,
        core=args.trainer_core,
        label=f"teacher.scoring={scoring}",
    )


def _means(rows: list[dict]) -> dict[str, float]:
    timed = rows[1:]  # step 1 pays one-off warm-ups
    keys = ["step_time"] + sorted({k for r in timed for k in r if k.startswith("time/")})
    return {k: statistics.mean(r.get(k, 0.0) for r in timed) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loss", choices=sorted(LOSSES), default="sampled_pg")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default="runs/bench_teacher_scoring")
    ap.add_argument("--server-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--trainer-core", default="0")
    ap.add_argument("--server-core", default="1")
    args = ap.parse_args()

    load_before = os.getloadavg()
    server = ServerProcess(
        resolve_tiny("text"),
        python=args.server_python,
        prefix=["taskset", "-c", args.server_core],
    )
    server.start()
    out = Path(args.out)
    runs: dict[str, list[list[dict]]] = {"local": [], "server": []}
    try:
        for r in range(args.repeats):
            for scoring in runs:
                runs[scoring].append(_run(args, server.url, out / f"{scoring}-{r}", scoring))
    finally:
        server.stop()
    load_after = os.getloadavg()

    print(
        f"workload: {args.loss}, batch {args.batch_size} x {args.n} samples, up to "
        f"{args.max_new_tokens} tokens, {args.steps} steps x {args.repeats} repeats per mode; "
        f"trainer on core {args.trainer_core}, server on core {args.server_core}"
    )
    print(
        "load average (1/5/15 min) before: {:.2f} {:.2f} {:.2f}, after: {:.2f} {:.2f} {:.2f}".format(
            *load_before, *load_after
        )
    )
    med = {
        scoring: {
            k: statistics.median(_means(rows)[k] if k in _means(rows) else 0.0 for rows in rs)
            for k in sorted({k for rows in rs for k in _means(rows)})
        }
        for scoring, rs in runs.items()
    }
    keys = sorted(set(med["local"]) | set(med["server"]))
    print(f"{'seconds per step (steps 2..N, median of repeats)':<50} {'local':>9} {'server':>9}")
    for k in keys:
        print(f"{k:<50} {med['local'].get(k, 0.0):>9.4f} {med['server'].get(k, 0.0):>9.4f}")
    ratio = med["local"]["step_time"] / med["server"]["step_time"]
    print(f"step time local / server: {ratio:.2f}")
    # The part the teacher's placement changes; rollouts (the same in both) only add noise.
    train = {s: sum(m.get(f"time/{k}", 0.0) for k in TRAIN_PHASES) for s, m in med.items()}
    print(
        f"teacher + teacher_score + student + optimizer: local {train['local']:.4f} s, server "
        f"{train['server']:.4f} s, local / server {train['local'] / train['server']:.2f}"
    )
    losses = {s: [r["loss"] for r in rs[0]] for s, rs in runs.items()}
    print("losses, first repeat (local):  " + " ".join(f"{x:.6g}" for x in losses["local"]))
    print("losses, first repeat (server): " + " ".join(f"{x:.6g}" for x in losses["server"]))


if __name__ == "__main__":
    main()
