"""Training tokens/s of an OPSD step: padded vs packed forwards, row vs token-budget
micro-batches, side by side in one process, on a long-tailed completion-length distribution.

Rollouts come from a stub engine that returns random ids with lognormal lengths (the same
lengths for every contender at a given step): only the training part of the step is measured
(teacher forward, student forward + backward, optimizer; ``time/teacher + time/student +
time/optimizer``). Contenders alternate step by step so machine noise hits all alike.

``trainer.packing=true`` packs through an attention that skips the packed block's masked
parts where one runs (CUDA: flash-attention's varlen kernel, or flex attention;
``opsd_mm.model.packing.resolve_packing``); there the bench adds "packed sdpa" contenders, the
same packed forwards through the model's own SDPA (what packing did before), so the attention's
share is visible. The last lines say what ``trainer.packing=auto`` resolves to here, rows and
token budgets, and the token budgets' packed / padded ratio (the GPU target: >= 1.2x).

    OMP_NUM_THREADS=1 python bench/step_throughput.py [--steps 4] [--hidden 384 --layers 6]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import build_model_dir, lognormal_lengths  # noqa: E402

from opsd_mm.model.forward import unwrap  # noqa: E402
from opsd_mm.model.packing import resolve_packing  # noqa: E402
from opsd_mm.types import Rollout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = {  # name -> overrides
    "padded, rows": ["trainer.packing=false", "trainer.micro_batch_tokens=0"],
    "packed, rows": ["trainer.packing=true", "trainer.micro_batch_tokens=0"],
    "padded, tokens": ["trainer.packing=false"],
    "packed, tokens": ["trainer.packing=true"],
}


class LengthsEngine:
    """Completions of lognormal lengths, drawn from the step's sampling seed."""

    def __init__(self, args: argparse.Namespace, ids: list[int]):
        self.args, self.ids = args, ids

    def generate(self, prompts, n, sampling):
        a = self.args
        total = len(prompts) * n
        lengths = lognormal_lengths(total, a.mean_len, a.sigma, a.max_len, sampling.seed)
        rng = random.Random(sampling.seed)
        it = iter(lengths)
        return [
            [Rollout([rng.choice(self.ids) for _ in range(next(it))], "length") for _ in range(n)]
            for _ in prompts
        ]

    def sync_weights(self, model, version=None):
        pass


def cfg_overrides(args: argparse.Namespace, run_dir: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"model.name_or_path={args.model_dir}",
        "trainer.save_every=0",
        "logging.progress=false",
        "logging.samples_every=0",
        f"trainer.max_steps={args.steps + args.warmup}",
        f"trainer.batch_size={args.prompts}",
        f"rollout.n={args.n}",
        f"trainer.micro_batch_size={args.micro_batch_size}",
        f"trainer.micro_batch_tokens={args.micro_batch_tokens}",
        *args.overrides,
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=0, help="0: the tiny tokenizer's")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--mean-len", type=float, default=96)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--max-len", type=int, default=768)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--micro-batch-tokens", type=int, default=2048)
    p.add_argument(
        "--contenders",
        nargs="+",
        choices=list(CONTENDERS),
        default=list(CONTENDERS),
        help="run only these (the ratios need 'padded, rows' and/or 'padded, tokens')",
    )
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from opsd_mm.cli import build_trainer
    from opsd_mm.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(
            Path(tmp) / "model", hidden=args.hidden, layers=args.layers, vocab=args.vocab
        )
        args.model_dir = model_dir
        trainers = {}
        for name, extra in CONTENDERS.items():
            if name not in args.contenders:
                continue
            cfg = load_config(
                ROOT / "configs" / "tiny_text.yaml",
                [*cfg_overrides(args, f"{tmp}/{len(trainers)}"), *extra],
            )
            t = build_trainer(cfg)
            tok = t.processor.tokenizer
            specials = set(tok.all_special_ids) | set(t.processor.suppress_token_ids)
            ids = [i for i in range(50, len(tok)) if i not in specials]
            t.engine = LengthsEngine(args, ids)
            trainers[name] = t
            if name.startswith("packed") and t.packed_attention is not None:
                # The same packed forwards through the model's own attention (SDPA).
                sdpa = build_trainer(
                    load_config(
                        ROOT / "configs" / "tiny_text.yaml",
                        [*cfg_overrides(args, f"{tmp}/{len(trainers)}"), *extra],
                    )
                )
                sdpa.engine, sdpa.packed_attention = t.engine, None
                trainers[name.replace("packed", "packed sdpa")] = sdpa
        auto = {}
        for kind, tokens in (("rows", 0), ("tokens", args.micro_batch_tokens)):
            plan = resolve_packing(
                unwrap(t.model),
                "auto",
                t.accelerator.device,
                half=t.accelerator.mixed_precision in ("bf16", "fp16"),
                micro_batch_tokens=tokens,
            )
            auto[kind] = plan.reason
        times = {name: [] for name in trainers}
        tokens, lengths_seen = [], []
        for step in range(args.warmup + args.steps):
            for name, t in trainers.items():
                m = t.train_step()
                train_s = sum(m.get(f"time/{k}", 0.0) for k in ("teacher", "student", "optimizer"))
                if step >= args.warmup:
                    times[name].append(train_s)
            if step >= args.warmup:
                pairs = t._last_step[1]
                tokens.append(sum(len(pr.completion_ids) for pr in pairs))
                lengths_seen += [len(pr.completion_ids) for pr in pairs]
    mean_len = statistics.mean(lengths_seen)
    print(
        f"OPSD step throughput: Qwen3 hidden {args.hidden} x {args.layers} layers, vocab "
        f"{t.model.config.vocab_size}; {args.prompts} prompts x n {args.n}; completion lengths "
        f"lognormal sigma {args.sigma}: mean {mean_len:.0f}, max {max(lengths_seen)} "
        f"(max/mean {max(lengths_seen) / mean_len:.1f}); micro_batch_size "
        f"{args.micro_batch_size}, micro_batch_tokens {args.micro_batch_tokens}; {args.steps} steps"
    )
    tps = {name: sum(tokens) / sum(ts) for name, ts in times.items()}
    head = f"{'contender':<24}{'train s/step':>14}{'train tok/s':>13}{'vs padded rows':>16}"
    print(head + f"{'vs padded tokens':>18}")
    for name, ts in times.items():
        line = f"{name:<24}{statistics.mean(ts):>14.2f}{tps[name]:>13.0f}"
        rows_base = tps.get("padded, rows")
        line += f"{tps[name] / rows_base:>15.2f}x" if rows_base else f"{'':>16}"
        if name.endswith("tokens") and "padded, tokens" in tps:
            line += f"{tps[name] / tps['padded, tokens']:>17.2f}x"
        print(line)
    packed = next((t for n, t in trainers.items() if n.startswith("packed,")), None)
    if packed is not None:
        attention = packed.packed_attention or "the model's own"
        print(f"packed forwards' attention: {attention}")
    for kind, reason in auto.items():
        print(f"trainer.packing=auto, {kind}: {reason}")
    if "packed, tokens" in tps and "padded, tokens" in tps:
        ratio = tps["packed, tokens"] / tps["padded, tokens"]
        print(f"token budgets packed / padded: {ratio:.2f}x (GPU target >= 1.2x)")


if __name__ == "__main__":
    main()
