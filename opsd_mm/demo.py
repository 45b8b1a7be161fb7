"""``opsd-mm demo``: the offline embedded default.

For now it trains the tiny text model with OPSD on the synthetic arithmetic task, offline,
from an embedded config (no files needed beside the installed package).
"""

from __future__ import annotations

import argparse

from opsd_mm.config import load_config


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=20, help="OPSD optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", default="runs/demo", help="where outputs go")


def run_demo(args: argparse.Namespace) -> int:
    from opsd_mm.cli import build_trainer

    cfg = load_config(
        None,
        [
            "model.name_or_path=tiny:text",
            "data.source=synthetic:arithmetic",
            "rollout.n=2",
            "rollout.max_new_tokens=32",
            f"trainer.max_steps={args.steps}",
            "trainer.save_every=0",
            f"seed={args.seed}",
            f"run_dir={args.run_dir}",
        ],
    )
    history = build_trainer(cfg).train()
    print(f"demo: {len(history)} OPSD steps, final loss {history[-1]['loss']:.6g}")
    return 0
