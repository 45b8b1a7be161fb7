"""Per-phase time split of OPSD training steps on the tiny text model (a baseline for later
performance work). Runs a few warm-up steps, then averages the phases over measured steps.

    python bench/step_breakdown.py [--steps 5] [--warmup 1] [key=value overrides ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from opsd_mm.cli import build_trainer
from opsd_mm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("rollout", "teacher", "student", "optimizer", "sync")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny_text.yaml"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(
            args.config,
            [
                f"run_dir={run_dir}",
                "trainer.save_every=0",
                "logging.progress=false",
                f"trainer.max_steps={args.steps + args.warmup}",
                *args.overrides,
            ],
        )
        trainer = build_trainer(cfg)
        for _ in range(args.warmup):
            trainer.train_step()
        rows = [trainer.train_step() for _ in range(args.steps)]
    total = sum(r["step_time"] for r in rows) / len(rows)
    tokens = sum(r["completion_len_mean"] for r in rows) / len(rows)
    print(
        f"OPSD step breakdown: {cfg.model.name_or_path}, {args.steps} steps, "
        f"batch {cfg.trainer.batch_size} x n {cfg.rollout.n}, "
        f"mean completion {tokens:.1f} tokens, loss.fused={cfg.loss.fused}"
    )
    print(f"{'phase':<12}{'ms/step':>10}{'share':>9}")
    accounted = 0.0
    for phase in PHASES:
        ms = 1000 * sum(r.get(f"time/{phase}", 0.0) for r in rows) / len(rows)
        accounted += ms
        print(f"{phase:<12}{ms:>10.1f}{ms / (1000 * total):>9.1%}")
    other = 1000 * total - accounted
    print(f"{'other':<12}{other:>10.1f}{other / (1000 * total):>9.1%}")
    print(f"{'total':<12}{1000 * total:>10.1f}{1.0:>9.1%}")


if __name__ == "__main__":
    main()
