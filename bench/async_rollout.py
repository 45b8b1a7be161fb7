"""Synchronous against asynchronous rollouts through the generation server, side by side.

Run from the main environment, with the vLLM environment beside it (``make venv venv-vllm``):

    .venv/bin/python bench/async_rollout.py --plot runs/bench_async.png

One ``opsd-mm serve`` (the vLLM environment) pinned to one core (``taskset -c 1``) serves every
run; each ``opsd-mm train configs/tiny_text.yaml rollout.engine=vllm_server`` run is pinned to
the other (``taskset -c 0``), one thread each. The runs: synchronous and ``rollout.async=true``
with seed 0, then synchronous with seed 1 (how far two seeds' losses differ: the noise the
async run's loss is judged against). Printed: completion tokens/s of each run (steps 2..N, so
neither run's first step, which is synchronous in both, counts), the async/sync ratio, the
mean loss of the last five steps, and the per-step loss curves; the curves go to ``--plot``.

Also printed: the training phases' time per step in both modes. Overlap pays only as far as
the two cores do not slow each other down; on the 2-core machine this was measured on, a
forward pass on one core ran 2.4-3x slower while vLLM generated on the other (a separate
process pinned there), so async gains less than (generation + training) / max(generation,
training) predicts.

Workload: async overlaps generation (the server's core) with training (the trainer's core),
so it pays most when the two cost about the same; the defaults (batch 4 x 2 samples of up to
64 tokens) are sized so on a 2-core CPU machine (the printed phase times show the balance).
The model is the tiny random one, whose losses are near-uniform noise (~1e-4): the comparison
says async does not change the loss beyond seed noise, not that either learns.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from opsd_mm.model.tiny import resolve_tiny
from opsd_mm.testing.server import ServerProcess, train_through_server

ROOT = Path(__file__).resolve().parents[1]
LAST = 5  # steps averaged for the final loss
TRAIN_PHASES = ("teacher", "student", "optimizer")


def _run(args: argparse.Namespace, url: str, run_dir: Path, mode: str, seed: int) -> list[dict]:
    overrides = [
        f"rollout.async={str(mode == 'async').lower()}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        f"rollout.n={args.n}",
        f"trainer.batch_size={args.batch_size}",
        f"trainer.micro_batch_size={args.batch_size * args.n}",
        f"trainer.max_steps={args.steps}",
        "trainer.save_every=0",
        "data.synthetic_size=256",
        f"seed={seed}",
    ]
    return train_through_server(
        ROOT / "configs" / "tiny_text.yaml",
        url,
        run_dir,
        overrides,
        core=args.trainer_core,
        label=f"{mode} seed {seed}",
    )


def _summary(rows: list[dict]) -> dict[str, float]:
    timed = rows[1:]  # step 1 samples synchronously in both modes
    tokens = sum(r["tokens_per_s"] * r["step_time"] for r in timed)
    seconds = sum(r["step_time"] for r in timed)
    phases = {
        k[len("time/") :]: statistics.mean(r.get(k, 0.0) for r in timed)
        for k in sorted({k for r in timed for k in r if k.startswith("time/")})
    }
    return {
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / len(timed),
        "final_loss": statistics.mean(r["loss"] for r in rows[-LAST:]),
        "staleness": statistics.mean(r["rollout/staleness_mean"] for r in timed),
        "phases": phases,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plot", required=True, help="PNG path for the loss curves")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default="runs/bench_async", help="where the runs' directories go")
    ap.add_argument("--server-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--trainer-core", default="0")
    ap.add_argument("--server-core", default="1")
    args = ap.parse_args()

    load_before = os.getloadavg()
    model = resolve_tiny("text")
    server = ServerProcess(
        model, python=args.server_python, prefix=["taskset", "-c", args.server_core]
    )
    server.start()
    out = Path(args.out)
    runs: dict[str, list[dict]] = {}
    start = time.perf_counter()
    try:
        for mode, seed in (("sync", 0), ("async", 0), ("sync", 1)):
            runs[f"{mode}-seed{seed}"] = _run(
                args, server.url, out / f"{mode}-seed{seed}", mode, seed
            )
    finally:
        server.stop()
    wall = time.perf_counter() - start
    load_after = os.getloadavg()

    s = {name: _summary(rows) for name, rows in runs.items()}
    print(
        f"workload: batch {args.batch_size} x {args.n} samples, up to {args.max_new_tokens} "
        f"tokens, {args.steps} steps; trainer on core {args.trainer_core}, server on core "
        f"{args.server_core}; {wall:.0f} s in all"
    )
    print(
        "load average (1/5/15 min) before: {:.2f} {:.2f} {:.2f}, after: {:.2f} {:.2f} {:.2f}".format(
            *load_before, *load_after
        )
    )
    print(
        f"{'run':12s} {'tokens/s':>9s} {'step s':>7s} {'staleness':>9s} {'loss(last 5)':>13s}  phases (s/step)"
    )
    for name, m in s.items():
        phases = " ".join(f"{k}={v:.3f}" for k, v in m["phases"].items())
        print(
            f"{name:12s} {m['tokens_per_s']:9.1f} {m['step_s']:7.3f} {m['staleness']:9.2f} "
            f"{m['final_loss']:13.4e}  {phases}"
        )
    ratio = s["async-seed0"]["tokens_per_s"] / s["sync-seed0"]["tokens_per_s"]
    print(f"async / sync tokens/s (seed 0): {ratio:.2f}x")
    train_s = {k: sum(s[k]["phases"].get(p, 0.0) for p in TRAIN_PHASES) for k in s}
    print(
        f"training phases ({'+'.join(TRAIN_PHASES)}) per step: sync {train_s['sync-seed0']:.3f} s, "
        f"async {train_s['async-seed0']:.3f} s ({train_s['async-seed0'] / train_s['sync-seed0']:.2f}x "
        "while the server generates on the other core)"
    )
    noise = abs(s["sync-seed1"]["final_loss"] - s["sync-seed0"]["final_loss"])
    diff = abs(s["async-seed0"]["final_loss"] - s["sync-seed0"]["final_loss"])
    print(
        f"final loss (mean of the last {LAST} steps): |async - sync| = {diff:.3e}; "
        f"|sync seed 1 - sync seed 0| = {noise:.3e} (seed noise)"
    )
    print("step " + " ".join(f"{name:>12s}" for name in runs))
    for i in range(args.steps):
        print(f"{i + 1:4d} " + " ".join(f"{rows[i]['loss']:12.4e}" for rows in runs.values()))

    from opsd_mm.train.plot import plot_runs

    print(f"plot: {plot_runs([out / name for name in runs], args.plot)}")


if __name__ == "__main__":
    main()
