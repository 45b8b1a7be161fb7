"""Our OPSD step against TRL's self-distillation trainer (``trl.experimental.sdft.SDFTTrainer``),
each contender in its own subprocess, on the same random model, prompts and completion lengths.

Shared set-up: a random Qwen3 (hidden 256 by default) with Qwen's 151,936-id vocabulary on the
tiny tokenizer; the synthetic arithmetic examples (question; privileged = the worked trace);
LoRA r 16 / alpha 32 on every projection; the teacher is the base model (LoRA off: ours
``teacher.kind=fixed``, TRL ``teacher_model_kind="base"``); rollouts by HF generate (n samples
per prompt, temperature 1); each step's completions cut to lengths drawn from a lognormal
(long tail), the same draws for both; the same optimizer (AdamW, constant lr, clip 1.0), fp32.
Prompts: the question verbatim for the student, our ``opsd_teacher_v1`` message (question,
reference solution, transition) for the teacher, given to TRL as its ``teacher_prompt_template``,
so both tokenise the same texts (mean prompt lengths are printed). Losses: full-vocabulary JSD
beta 0.5 (ours ``loss.divergence=jsd``, TRL ``full_logits`` alpha 0.5) and the sampled-token
reverse-KL policy gradient (ours ``sampled_pg``, TRL ``sampled_token``). Ours runs its defaults:
fused loss, packed forwards, token-budget micro-batches. What differs by design: TRL's loss
normalisation (the mean over sequences of each sequence's token mean; ours the step's token
mean).

Measured per optimizer step after warm-up: the whole step, the training part (the step minus
HF generate), completion tokens; peak RSS of the child (``ru_maxrss``) and its RSS after the
model loaded.

    OMP_NUM_THREADS=1 python bench/vs_trl.py [--steps 2] [--modes jsd sampled]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import QWEN_VOCAB, build_model_dir, lognormal_lengths  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEACHER_TEMPLATE = "opsd_teacher_v1"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_cuda_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


class Cutter:
    """Cuts a step's completions to drawn lengths and maps ids past the tokenizer into ordinary
    ids (the random model samples its whole 151,936-id vocabulary; the tokenizer has ~1.5k)."""

    def __init__(self, args: argparse.Namespace, ids: list[int], n_tok: int):
        self.args, self.ids, self.n_tok, self.calls = args, ids, n_tok, 0

    def cut(self, completions: list[list[int]]) -> list[list[int]]:
        a = self.args
        lengths = lognormal_lengths(len(completions), a.mean_len, a.sigma, a.max_len, self.calls)
        self.calls += 1
        rng = random.Random(self.calls)
        out = []
        for c, n in zip(completions, lengths):
            c = [t if t < self.n_tok and t in self.ok else rng.choice(self.ids) for t in c[:n]]
            out.append(c + [rng.choice(self.ids) for _ in range(n - len(c))])  # early EOS: pad
        return out

    @property
    def ok(self) -> set[int]:
        if not hasattr(self, "_ok"):
            self._ok = set(self.ids)
        return self._ok


def run_ours(args: argparse.Namespace, model_dir: Path, run_dir: Path) -> dict:
    from opsd_mm.cli import build_trainer
    from opsd_mm.config import load_config

    loss = ["loss.divergence=jsd", "loss.beta=0.5"]
    if args.mode == "sampled":
        loss = ["loss.divergence=sampled_pg"]
    cfg = load_config(
        ROOT / "configs" / "tiny_text.yaml",
        [
            f"run_dir={run_dir}",
            f"model.name_or_path={model_dir}",
            "model.lora.r=16",
            "model.lora.alpha=32",
            "teacher.kind=fixed",
            "processor.student_template=plain",
            f"processor.teacher_template={TEACHER_TEMPLATE}",
            f"data.synthetic_size={args.prompts * (args.steps + args.warmup)}",
            "data.shuffle=false",
            f"trainer.batch_size={args.prompts}",
            f"rollout.n={args.n}",
            f"rollout.max_new_tokens={args.max_len}",
            f"trainer.micro_batch_size={args.micro_batch_size}",
            f"trainer.micro_batch_tokens={args.micro_batch_tokens}",
            "trainer.lr=1e-4",
            "trainer.lr_schedule=constant",
            "trainer.max_grad_norm=1.0",
            "trainer.save_every=0",
            "logging.progress=false",
            "logging.samples_every=0",
            f"trainer.max_steps={args.steps + args.warmup}",
            *loss,
            *args.ours,
        ],
    )
    t = build_trainer(cfg)
    tok = t.processor.tokenizer
    bad = set(tok.all_special_ids) | set(t.processor.suppress_token_ids)
    cutter = Cutter(args, [i for i in range(50, len(tok)) if i not in bad], len(tok))
    generate = t.engine.generate

    def cut_generate(prompts, n, sampling):
        out = generate(prompts, n, sampling)
        flat = [r for rs in out for r in rs]
        for r, ids in zip(flat, cutter.cut([r.completion_ids for r in flat])):
            r.completion_ids, r.finish_reason, r.logprobs = ids, "length", None
        return out

    t.engine.generate = cut_generate
    base = rss_mib()
    rows = []
    for step in range(args.warmup + args.steps):
        m = t.train_step()
        if step >= args.warmup:
            pairs = t._last_step[1]
            rows.append(
                {
                    "step_s": m["step_time"],
                    "train_s": m["step_time"] - m.get("time/rollout", 0.0),
                    "tokens": sum(len(p.completion_ids) for p in pairs),
                    "prompt_len": sum(len(p.student.input_ids) for p in pairs) / len(pairs),
                    "teacher_prompt_len": sum(len(p.teacher.input_ids) for p in pairs) / len(pairs),
                }
            )
    return {
        "rows": rows,
        "base_rss_mib": base,
        "peak_rss_mib": peak_mib(),
        "peak_cuda_mib": peak_cuda_mib(),
    }


def run_trl(args: argparse.Namespace, model_dir: Path, run_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from opsd_mm.data.tasks import make_arithmetic_examples

    examples = make_arithmetic_examples(args.prompts * (args.steps + args.warmup), seed=0)
    ds = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": ex.question}],
                "privileged_context": ex.privileged,
            }
            for ex in examples
        ]
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    rows_per_step = args.prompts * args.n
    ga = max(1, rows_per_step // args.micro_batch_size)
    mode = dict(distillation_mode="full_logits", distillation_alpha=0.5)
    if args.mode == "sampled":
        mode = dict(distillation_mode="sampled_token", distillation_alpha=1.0)
    from opsd_mm.processors.templates import get_template

    # Our teacher message, in TRL's placeholders: both contenders see the same prompt texts.
    teacher_text = get_template(TEACHER_TEMPLATE, "teacher").text
    teacher_text = teacher_text.replace("{question}", "{prompt}")
    teacher_text = teacher_text.replace("{privileged}", "{privileged_context}")
    cfg = SDFTConfig(
        teacher_prompt_template=teacher_text,
        output_dir=str(run_dir),
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),  # ours: mixed_precision=auto, bf16 autocast on CUDA
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=ga,
        num_generations=args.n,
        max_completion_length=args.max_len,
        temperature=1.0,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=args.steps + args.warmup,
        teacher_model_kind="base",
        distillation_is_clip=None,
        save_strategy="no",
        report_to=[],
        logging_steps=10_000,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=0,
        **mode,
    )
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)
    trainer = SDFTTrainer(
        model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft
    )
    bad = set(tok.all_special_ids)
    cutter = Cutter(args, [i for i in range(50, len(tok)) if i not in bad], len(tok))
    gen_s: list[float] = []
    generate = trainer._generate_transformers

    def cut_generate(prompt_ids):
        t0 = time.perf_counter()
        prompts, completions = generate(prompt_ids)
        gen_s.append(time.perf_counter() - t0)
        return prompts, cutter.cut(completions)

    trainer._generate_transformers = cut_generate
    rows: list[dict] = []
    tokens: list[int] = []
    tokenize = trainer._tokenize_prompts
    prompt_lens: list[float] = []

    def tokenize_and_count(prompts):
        ids = tokenize(prompts)
        prompt_lens.append(sum(len(i) for i in ids) / len(ids))
        return ids

    trainer._tokenize_prompts = tokenize_and_count
    record = trainer._record_completion_metrics

    def count(mode_, batch):
        tokens.append(int(batch["completion_mask"].sum()))
        return record(mode_, batch)

    trainer._record_completion_metrics = count

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0, self.n_gen, self.n_tok = time.perf_counter(), len(gen_s), len(tokens)

        def on_step_end(self, a, state, control, **kw):
            if state.global_step <= args.warmup:
                return
            step = time.perf_counter() - self.t0
            gen = sum(gen_s[self.n_gen :])
            n_tok = sum(tokens[self.n_tok :])
            lens = prompt_lens[-2:]  # student, then teacher prompts of the last generation
            rows.append(
                {
                    "step_s": step,
                    "train_s": step - gen,
                    "tokens": n_tok,
                    "prompt_len": lens[0],
                    "teacher_prompt_len": lens[-1],
                }
            )

    trainer.add_callback(Clock())
    base = rss_mib()
    trainer.train()
    return {
        "rows": rows,
        "base_rss_mib": base,
        "peak_rss_mib": peak_mib(),
        "peak_cuda_mib": peak_cuda_mib(),
    }


def child(args: argparse.Namespace) -> None:
    run = run_ours if args.child == "ours" else run_trl
    with tempfile.TemporaryDirectory() as tmp:
        out = run(args, Path(args.model_dir), Path(tmp) / "run")
    print("RESULT " + json.dumps(out))


def above(r: dict) -> float:
    """Peak RSS above the RSS after the model loaded (MiB): what the steps added."""
    return r["peak_rss_mib"] - r["base_rss_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--mean-len", type=float, default=48)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--micro-batch-tokens", type=int, default=2048)
    p.add_argument("--modes", nargs="+", default=["jsd", "sampled"])
    p.add_argument("--ours", nargs="*", default=[], help="extra key=value overrides for ours")
    p.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--mode", default="jsd", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(
            Path(tmp) / "model", hidden=args.hidden, layers=args.layers, vocab=args.vocab
        )
        passthrough = [
            a
            for a in sys.argv[1:]
            if not a.startswith("--modes") and a not in args.modes and a != "--ours"
        ]
        results: dict[tuple[str, str], dict] = {}
        for mode in args.modes:
            for who in ("ours", "trl"):
                cmd = [sys.executable, __file__, "--child", who, "--mode", mode]
                cmd += ["--model-dir", str(model_dir), *passthrough]
                if args.ours:
                    cmd += ["--ours", *args.ours]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    print(f"{who} {mode}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
                    continue
                results[(mode, who)] = json.loads(line[-1][7:])
    lens = lognormal_lengths(args.prompts * args.n * 64, args.mean_len, args.sigma, args.max_len, 0)
    print(
        f"Ours vs TRL SDFTTrainer: Qwen3 hidden {args.hidden} x {args.layers} layers, vocab "
        f"{args.vocab}, LoRA r16, base teacher, fp32 CPU; {args.prompts} prompts x n {args.n} per "
        f"step; completions cut to lognormal lengths (mean {args.mean_len:g}, sigma {args.sigma}, "
        f"cap {args.max_len}; max/mean of a large draw {max(lens) / (sum(lens) / len(lens)):.1f}); "
        f"{args.steps} measured steps after {args.warmup} warm-up"
    )
    head = f"{'mode':<9}{'who':<6}{'step tok/s':>11}{'train tok/s':>12}{'peak RSS MiB':>13}"
    print(head + f"{'above load':>11}{'prompt/teacher len':>20}")
    for mode in args.modes:
        for who in ("ours", "trl"):
            r = results.get((mode, who))
            if not r:
                continue
            rows = r["rows"]
            tok = sum(x["tokens"] for x in rows)
            r["step_tps"] = tok / sum(x["step_s"] for x in rows)
            r["train_tps"] = tok / sum(x["train_s"] for x in rows)
            pl = sum(x["prompt_len"] for x in rows) / len(rows)
            tl = sum(x["teacher_prompt_len"] for x in rows) / len(rows)
            print(
                f"{mode:<9}{who:<6}{r['step_tps']:>11.0f}{r['train_tps']:>12.0f}"
                f"{r['peak_rss_mib']:>13.0f}{above(r):>11.0f}"
                f"{pl:>11.0f} / {tl:<6.0f}"
            )
        o, t = results.get((mode, "ours")), results.get((mode, "trl"))
        if o and t and o.get("peak_cuda_mib"):
            cuda = o["peak_cuda_mib"], t["peak_cuda_mib"]
            print(f"{mode:<9}peak CUDA MiB ours {cuda[0]:.0f}, TRL {cuda[1]:.0f}")
        if o and t:
            print(
                f"{mode:<9}ratio ours/TRL: step tok/s {o['step_tps'] / t['step_tps']:.2f}x, train "
                f"tok/s {o['train_tps'] / t['train_tps']:.2f}x, peak RSS "
                f"{o['peak_rss_mib'] / t['peak_rss_mib']:.2f}x, peak above load "
                f"{above(o) / above(t):.2f}x"
            )


if __name__ == "__main__":
    main()
