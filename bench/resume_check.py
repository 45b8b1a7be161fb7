"""Checkpoint and resume exactness of a real launch: an uninterrupted run of ``--steps`` steps
against one that stops a step earlier (checkpointing every step) and is resumed for the last
step. Prints both last-step losses and PASS / FAIL; exit status 1 on a failure.

    python bench/resume_check.py --out DIR [--launch "accelerate launch ..."] [--sharded] \\
        [key=value overrides ...]

``--launch`` is the command prefix before ``-m opsd_mm.cli train`` (default: this Python, one
plain process). ``bench/gpu_checks.sh`` runs it under ``accelerate launch --config_file
configs/accelerate/fsdp2.yaml`` (FSDP2, nccl) with ``--sharded``, which also requires the
checkpoints to be sharded (``sharded/``). The tiny model is built here first, so processes
never race to build it. Tolerance ``--rtol``: a GPU may reorder reductions between runs; on
the CPU the losses are equal exactly.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from opsd_mm.model.tiny import resolve_tiny
from opsd_mm.train import checkpoint as ckpt
from opsd_mm.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def train(launch: list[str], config: str, run_dir: Path, *overrides: str) -> list[float]:
    """One ``opsd-mm train`` launch; the losses in its run_dir's metrics.jsonl."""
    cmd = [*launch, "-m", "opsd_mm.cli", "train", config, f"run_dir={run_dir}", *overrides]
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="run directories go here")
    parser.add_argument("--launch", default=f"{shlex.quote(sys.executable)}")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny_text.yaml"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sharded", action="store_true", help="require sharded checkpoints")
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out, launch, n = Path(args.out), shlex.split(args.launch), args.steps
    cache = out / "tiny-cache"
    resolve_tiny("text", cache)  # the default config's model; others build on first use
    common = [
        f"model.tiny_cache_dir={cache}",
        "logging.progress=false",
        "trainer.save_every=1",
        f"trainer.keep_last={n}",
        f"trainer.schedule_steps={n}",  # the same LR schedule for the shorter run
        *args.overrides,
    ]
    full = train(launch, args.config, out / "full", f"trainer.max_steps={n}", *common)
    part = out / "part"
    train(launch, args.config, part, f"trainer.max_steps={n - 1}", *common)
    saved = ckpt.latest_checkpoint(part)
    sharded = saved is not None and ckpt.is_sharded(saved)
    print(f"checkpoint {saved}: {'sharded' if sharded else 'whole'}")
    resumed = train(
        launch, args.config, part, f"trainer.max_steps={n}", "trainer.resume=true", *common
    )
    a, b = full[-1], resumed[-1]
    rel = abs(a - b) / max(abs(a), 1e-30)
    print(f"step {n} loss: uninterrupted {a!r}, resumed {b!r}, relative difference {rel:.2e}")
    print(f"losses uninterrupted {full}\nlosses resumed       {resumed}")
    exact = "exactly equal" if a == b else f"within rtol {args.rtol}"
    checks = {
        "checkpoint written" + (", sharded" if args.sharded else ""): saved is not None
        and (sharded or not args.sharded),
        f"every step logged ({n})": len(full) == len(resumed) == n,
        f"resumed loss {exact}": rel <= args.rtol,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
