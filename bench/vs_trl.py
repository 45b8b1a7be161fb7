"""Our OPSD step against TRL's self-distillation trainer (``trl.experimental.sdft.SDFTTrainer``),
each contender in its own subprocess, on the same random model, prompts and completions.

Fair by default, as a TRL user would set TRL up for speed:

- TRL at its best settings (the ``trl`` rows): ``per_device_train_batch_size=1`` (its batching
  pads every row of a micro-batch to the longest and computes full logits over the padding),
  ``generation_batch_size`` = the generations per prompt, ``shuffle_dataset=False`` (the same
  prompt order as ours); TRL as shipped (``trl-shipped``: its default batch of 8 rows per
  micro-batch, one generation batch per step, gradient checkpointing on) as a second row.
- Gradient checkpointing equal on both sides: off (``--gradient-checkpointing`` turns it on for
  ours and TRL's best row; the shipped row keeps TRL's default, on).
- Rollouts are fixed token lists fed to both sides: the run's completions are drawn once (row k
  of the run, prompts in order and n per prompt, gets a lognormal length and random ordinary
  token ids) and each contender's generation call returns the next ones, so decoding is not the
  bench (a random model never samples EOS: it would decode to the cap every time). Both train
  on the identical tokens; the step's "generation" is a list lookup.

Shared set-up: a random Qwen3 (hidden 256 x 2 layers by default) with Qwen's 151,936-id vocabulary
on the tiny tokenizer; the synthetic arithmetic examples (question; privileged = the worked
trace); LoRA r 16 / alpha 32 on every projection; the teacher is the base model (ours
``teacher.kind=fixed``, TRL ``teacher_model_kind="base"``); the same optimizer (AdamW, constant
lr, clip 1.0); fp32 on a CPU, bf16 weights and autocast on CUDA. Prompts: the question for the
student, our ``opsd_teacher_v1`` message for the teacher, given to TRL as its
``teacher_prompt_template`` (mean prompt lengths are printed). Losses: full-vocabulary JSD beta
0.5 (ours ``loss.divergence=jsd``, TRL ``full_logits`` alpha 0.5) and the sampled-token
reverse-KL policy gradient (ours ``sampled_pg``, TRL ``sampled_token``). Ours runs its defaults
(fused loss, ``loss.kernel`` and ``trainer.packing`` auto) with a token budget per micro-batch.
What differs by design: TRL's loss normalisation (the mean over sequences of each sequence's
token mean; ours the step's token mean).

Measured per optimizer step after warm-up: the whole step, the training part (the step minus
the generation call), completion tokens; peak memory (CPU: the child's ``ru_maxrss`` and its RSS
after the model loaded; CUDA: ``max_memory_allocated``); on CUDA the training part's MFU: the
step's useful FLOPs (real tokens: teacher forward, student forward and backward, attention,
lm_head on the completion tokens; :func:`step_flops`) over the time and ``--peak-tflops``. Each
child prints its phases as they end.

    OMP_NUM_THREADS=1 python bench/vs_trl.py [--steps 2] [--modes jsd sampled]
    python bench/vs_trl.py --real-shape          # on a GPU: a Qwen3-1.7B-shaped model, bf16
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
CONTENDERS = ("trl", "trl-shipped", "ours")  # TRL's best settings first
# A Qwen3-1.7B-shaped model (its config.json): the shape of --real-shape.
QWEN3_1_7B = dict(
    hidden=2048, layers=28, intermediate=6144, heads=16, kv_heads=8, head_dim=128, tie=True
)
# Ours at 4,096 tokens per micro-batch: without gradient checkpointing a 1.7B model keeps ~2.5 MB
# of activations per token (~10 GiB at 4k tokens, ~40 GiB at 16k), against TRL's batch of one
# row (up to ~2.2k tokens here) plus its fp32 [row x V] logits; 4k tokens still fill an H200.
REAL_SHAPE = dict(
    steps=3,
    warmup=1,
    prompts=8,
    n=4,
    mean_len=512,
    sigma=1.0,
    max_len=2048,
    micro_batch_tokens=4096,
)
# The bf16 matmul peak (TFLOP/s) by device name, for the MFU: the H200's as measured on the
# project's GPU machine (docs/environment.md; the 38% of HF's own loop is relative to it).
# Elsewhere pass --peak-tflops.
PEAK_TFLOPS = {"H200": 790.0}


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_mib(kind: str) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    fn = torch.cuda.max_memory_allocated if kind == "peak" else torch.cuda.memory_allocated
    return fn() / 2**20


def say(args: argparse.Namespace, text: str) -> None:
    """A phase line, printed (and flushed) as the phase ends."""
    print(f"[{args.child} {args.mode}] {text}", flush=True)


# ----------------------------------------------------------------------------- completions


def draw_completions(args: argparse.Namespace, ids: list[int]) -> list[list[int]]:
    """Every completion of the run, in the order both trainers consume them (prompts in data
    order, n per prompt): row k gets a lognormal length and random ids, from seed k alone."""
    rows = (args.steps + args.warmup) * args.prompts * args.n
    out = []
    for k in range(rows):
        (length,) = lognormal_lengths(1, args.mean_len, args.sigma, args.max_len, seed=1000 + k)
        rng = random.Random(k)
        out.append([rng.choice(ids) for _ in range(length)])
    return out


class Completions:
    """Hands out the run's fixed completions in order and times each call."""

    def __init__(self, rows: list[list[int]]):
        self.rows, self.next, self.seconds = rows, 0, []

    def take(self, count: int) -> list[list[int]]:
        t0 = time.perf_counter()
        if self.next + count > len(self.rows):
            raise RuntimeError(f"asked for {count} completions, {len(self.rows) - self.next} left")
        out = [list(r) for r in self.rows[self.next : self.next + count]]
        self.next += count
        self.seconds.append(time.perf_counter() - t0)
        return out


def step_flops(shape: dict, rows: list[tuple[int, int, int]], full_ft: bool) -> float:
    """Useful FLOPs of one training step: per row (student prompt, teacher prompt, completion
    tokens), the teacher's forward and the student's forward and backward over real tokens only
    (no padding, no recomputation). Forward per sequence of L tokens: 2 L x the decoder's
    matmul parameters, causal attention 2 L^2 x heads x head_dim per layer (QK^T and AV, each
    2 L^2 d / 2 under the mask), and the lm_head 2 V H on the completion tokens. Backward: 2x
    the forward with the weights training, 1x under LoRA (activation gradients only; the
    adapters add ~0)."""
    h, layers, inter = shape["hidden"], shape["layers"], shape["intermediate"]
    q, kv = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    params = layers * (h * q + 2 * h * kv + q * h + 3 * h * inter)

    def forward(length: int, completion: int) -> float:
        attention = layers * 2 * length * length * q
        return 2 * length * params + attention + 2 * shape["vocab"] * h * completion

    total = 0.0
    for student, teacher, completion in rows:
        s_fwd = forward(student + completion, completion)
        total += forward(teacher + completion, completion) + s_fwd * (3 if full_ft else 2)
    return total


# ----------------------------------------------------------------------------- ours


def run_ours(args: argparse.Namespace, model_dir: Path, run_dir: Path, rows: list) -> dict:
    import torch

    from opsd_mm.cli import build_trainer
    from opsd_mm.config import load_config
    from opsd_mm.types import Rollout

    loss = ["loss.divergence=jsd", "loss.beta=0.5"]
    if args.mode == "sampled":
        loss = ["loss.divergence=sampled_pg"]
    t0 = time.perf_counter()
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
            f"trainer.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
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
    completions = Completions(rows)

    class FixedEngine:
        def generate(self, prompts, n, sampling):
            got = iter(completions.take(len(prompts) * n))
            return [[Rollout(next(got), "length") for _ in range(n)] for _ in prompts]

        def sync_weights(self, model, version=None):
            pass

    t.engine = FixedEngine()
    base, base_cuda = rss_mib(), cuda_mib("now")
    say(
        args,
        f"loaded in {time.perf_counter() - t0:.1f} s; RSS {base:.0f} MiB; packed "
        f"{t.packing} ({t.packed_attention or 'own attention'}); micro_batch_tokens "
        f"{cfg.trainer.micro_batch_tokens}",
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out_rows = []
    for step in range(args.warmup + args.steps):
        c0 = time.process_time()
        m = t.train_step()
        pairs = t._last_step[1]
        row = {
            "step_s": m["step_time"],
            "train_s": m["step_time"] - m.get("time/rollout", 0.0),
            "cpu_s": time.process_time() - c0,
            "tokens": sum(len(p.completion_ids) for p in pairs),
            "seqs": [
                (len(p.student.input_ids), len(p.teacher.input_ids), len(p.completion_ids))
                for p in pairs
            ],
        }
        warm = " (warm-up)" if step < args.warmup else ""
        say(args, f"step {step + 1}{warm}: {row['step_s']:.2f} s, train {row['train_s']:.2f} s")
        if step >= args.warmup:
            out_rows.append(row)
    return {
        "rows": out_rows,
        "base_rss_mib": base,
        "peak_rss_mib": peak_mib(),
        "base_cuda_mib": base_cuda,
        "peak_cuda_mib": cuda_mib("peak"),
        "full_ft": not cfg.model.lora.enabled,
    }


# ----------------------------------------------------------------------------- TRL


def trl_config(args: argparse.Namespace, run_dir: Path, shipped: bool):
    """TRL's SDFTConfig: the same problem (prompts, n, optimizer, loss); batching and
    checkpointing at TRL's best settings, or as shipped."""
    import torch
    from trl.experimental.sdft import SDFTConfig

    from opsd_mm.processors.templates import get_template

    rows_per_step = args.prompts * args.n
    mode = dict(distillation_mode="full_logits", distillation_alpha=0.5)
    if args.mode == "sampled":
        mode = dict(distillation_mode="sampled_token", distillation_alpha=1.0)
    # Our teacher message, in TRL's placeholders: both contenders see the same prompt texts.
    teacher_text = get_template(TEACHER_TEMPLATE, "teacher").text
    teacher_text = teacher_text.replace("{question}", "{prompt}")
    teacher_text = teacher_text.replace("{privileged}", "{privileged_context}")
    if shipped:
        # TRL's defaults: 8 rows per micro-batch, one generation batch per optimizer step,
        # gradient checkpointing on.
        batch = min(SDFTConfig.per_device_train_batch_size, rows_per_step)
        batching = dict(per_device_train_batch_size=batch)
    else:
        batch = 1
        batching = dict(
            per_device_train_batch_size=1,
            generation_batch_size=args.n,
            gradient_checkpointing=args.gradient_checkpointing,
        )
    cuda = torch.cuda.is_available()
    return SDFTConfig(
        teacher_prompt_template=teacher_text,
        output_dir=str(run_dir),
        use_cpu=not cuda,
        bf16=cuda,  # ours: mixed_precision=auto, bf16 autocast on CUDA
        gradient_accumulation_steps=max(1, rows_per_step // batch),
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
        disable_tqdm=True,
        shuffle_dataset=False,
        seed=0,
        **batching,
        **mode,
    )


def run_trl(args: argparse.Namespace, model_dir: Path, run_dir: Path, rows: list) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTTrainer

    from opsd_mm.data.tasks import make_arithmetic_examples

    t0 = time.perf_counter()
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
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    cfg = trl_config(args, run_dir, shipped=args.child == "trl-shipped")
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)
    trainer = SDFTTrainer(
        model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft
    )
    completions = Completions(rows)
    trainer._generate = lambda prompt_ids: (prompt_ids, completions.take(len(prompt_ids)))
    seqs: list[tuple[int, int, int]] = []
    builder = trainer.teacher_context_builder
    build = builder.build

    def build_and_count(prompts, privileged, completion_ids, completion_mask):
        out = build(prompts, privileged, completion_ids, completion_mask)
        teacher_len = out["teacher_attention_mask"].sum(1) - completion_mask.sum(1)
        student_len = [len(i) for i in trainer._tokenize_prompts(prompts)]
        for s, t, c in zip(student_len, teacher_len.tolist(), completion_mask.sum(1).tolist()):
            seqs.append((s, int(t), int(c)))
        return out

    builder.build = build_and_count
    out_rows: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0, self.n_gen, self.n_seq = (
                time.perf_counter(),
                len(completions.seconds),
                len(seqs),
            )
            self.c0 = time.process_time()

        def on_step_end(self, a, state, control, **kw):
            step = time.perf_counter() - self.t0
            cpu = time.process_time() - self.c0
            gen = sum(completions.seconds[self.n_gen :])
            step_seqs = seqs[self.n_seq :]
            warm = " (warm-up)" if state.global_step <= args.warmup else ""
            say(args, f"step {state.global_step}{warm}: {step:.2f} s, train {step - gen:.2f} s")
            if state.global_step > args.warmup:
                out_rows.append(
                    {
                        "step_s": step,
                        "train_s": step - gen,
                        "cpu_s": cpu,
                        "tokens": sum(c for _, _, c in step_seqs),
                        "seqs": step_seqs,
                    }
                )

    trainer.add_callback(Clock())
    base, base_cuda = rss_mib(), cuda_mib("now")
    say(
        args,
        f"loaded in {time.perf_counter() - t0:.1f} s; RSS {base:.0f} MiB; "
        f"per_device_train_batch_size {cfg.per_device_train_batch_size}, gradient accumulation "
        f"{cfg.gradient_accumulation_steps}, generation_batch_size {cfg.generation_batch_size}, "
        f"gradient checkpointing {cfg.gradient_checkpointing}",
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {
        "rows": out_rows,
        "base_rss_mib": base,
        "peak_rss_mib": peak_mib(),
        "base_cuda_mib": base_cuda,
        "peak_cuda_mib": cuda_mib("peak"),
        "full_ft": False,
    }


def child(args: argparse.Namespace) -> None:
    run = run_ours if args.child == "ours" else run_trl
    rows = json.loads(Path(args.completions).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        out = run(args, Path(args.model_dir), Path(tmp) / "run", rows)
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- parent


def child_argv(args: argparse.Namespace, who: str, mode: str, model_dir, completions) -> list[str]:
    """The child's command line, from the parsed options (never the raw argv: an option's value
    passed through twice lands as a stray positional)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", who, "--mode", mode]
    cmd += ["--model-dir", str(model_dir), "--completions", str(completions)]
    for name in ("steps", "warmup", "prompts", "n", "mean_len", "sigma", "max_len"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    cmd += ["--micro-batch-size", str(args.micro_batch_size)]
    cmd += ["--micro-batch-tokens", str(args.micro_batch_tokens)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if args.ours:
        cmd += ["--ours", *args.ours]
    return cmd


def run_child(cmd: list[str], timeout: float | None) -> tuple[int, dict | None, str]:
    """Run one contender, echoing its phase lines as they come; (exit code, result, tail)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ
    )
    result, tail = None, []
    deadline = None if timeout is None else time.monotonic() + timeout
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
        else:  # a phase line, possibly after a progress bar's carriage returns
            for segment in line.rstrip("\n").split("\r"):
                if segment.startswith("["):
                    print("  " + segment, flush=True)
        tail = (tail + [line])[-40:]
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
            return -9, None, "".join(tail) + "\n(killed: --child-timeout)"
    return proc.wait(), result, "".join(tail)


def summarise(r: dict, shape: dict | None, peak_tflops: float | None) -> dict:
    rows = r["rows"]
    tokens = sum(x["tokens"] for x in rows)
    r["step_tps"] = tokens / sum(x["step_s"] for x in rows)
    r["train_tps"] = tokens / sum(x["train_s"] for x in rows)
    # Tokens per CPU second of the whole step (one thread on a CPU: the work, less exposed than
    # wall time to what else runs on the machine while the contenders run one after another).
    r["cpu_tps"] = tokens / max(sum(x["cpu_s"] for x in rows), 1e-9)
    seqs = [s for x in rows for s in x["seqs"]]
    r["prompt_len"] = sum(s for s, _, _ in seqs) / len(seqs)
    r["teacher_prompt_len"] = sum(t for _, t, _ in seqs) / len(seqs)
    r["mfu"] = None
    if shape and peak_tflops:
        flops = sum(step_flops(shape, x["seqs"], r["full_ft"]) for x in rows)
        r["mfu"] = flops / sum(x["train_s"] for x in rows) / (peak_tflops * 1e12)
    cuda = r.get("peak_cuda_mib") is not None
    r["peak"] = r["peak_cuda_mib"] if cuda else r["peak_rss_mib"]
    r["above"] = r["peak"] - (r["base_cuda_mib"] if cuda else r["base_rss_mib"])
    return r


def peak_tflops_here(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
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
    p.add_argument("--modes", nargs="+", default=["jsd", "sampled"], choices=["jsd", "sampled"])
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="on for ours and TRL's best row (default off for both; TRL as shipped: on)",
    )
    p.add_argument(
        "--real-shape",
        action="store_true",
        help="a Qwen3-1.7B-shaped random model (bf16 on CUDA) and longer completions: "
        + ", ".join(f"{k}={v}" for k, v in REAL_SHAPE.items()),
    )
    p.add_argument("--peak-tflops", type=float, help="the device's peak, for the MFU (CUDA)")
    p.add_argument("--child-timeout", type=float, help="seconds per contender before it is cut")
    p.add_argument("--ours", nargs="*", default=[], help="extra key=value overrides for ours")
    p.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="jsd", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--completions", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.real_shape and not args.child:
        for k, v in REAL_SHAPE.items():
            setattr(args, k, v)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    shape = dict(
        hidden=args.hidden,
        layers=args.layers,
        intermediate=3 * args.hidden,
        heads=4,
        kv_heads=2,
        head_dim=args.hidden // 4,
        tie=False,
    )
    if args.real_shape:
        shape = dict(QWEN3_1_7B)
    shape["vocab"] = args.vocab
    import torch

    cuda = torch.cuda.is_available()
    peak_tflops = peak_tflops_here(args)
    results: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model_dir = build_model_dir(
            Path(tmp) / "model",
            hidden=shape["hidden"],
            layers=shape["layers"],
            vocab=args.vocab,
            heads=shape["heads"],
            kv_heads=shape["kv_heads"],
            head_dim=shape["head_dim"],
            intermediate=shape["intermediate"],
            tie=shape["tie"],
            dtype=torch.bfloat16 if args.real_shape else torch.float32,
        )
        from opsd_mm.config import ProcessorConfig
        from opsd_mm.processors import build_processor

        proc = build_processor(ProcessorConfig(), str(model_dir), "text")
        tok = proc.tokenizer
        bad = set(tok.all_special_ids) | set(proc.suppress_token_ids)
        rows = draw_completions(args, [i for i in range(50, len(tok)) if i not in bad])
        completions = Path(tmp) / "completions.json"
        completions.write_text(json.dumps(rows))
        lengths = [len(r) for r in rows]
        print(
            f"model built in {time.perf_counter() - t0:.1f} s; {len(rows)} completions, mean "
            f"{sum(lengths) / len(lengths):.0f} tokens, max {max(lengths)}",
            flush=True,
        )
        for mode in args.modes:
            for who in args.contenders:
                print(f"{who} {mode}: starting", flush=True)
                cmd = child_argv(args, who, mode, model_dir, completions)
                code, result, tail = run_child(cmd, args.child_timeout)
                if code or result is None:
                    print(f"{who} {mode}: failed (exit {code})\n{tail[-3000:]}", flush=True)
                    continue
                results[(mode, who)] = summarise(result, shape, peak_tflops)
                r = results[(mode, who)]
                print(
                    f"{who} {mode}: done: train {r['train_tps']:.0f} tok/s, peak "
                    f"{r['peak']:.0f} MiB",
                    flush=True,
                )
    report(args, shape, results, cuda, peak_tflops)
    return 0 if results else 1


def report(args, shape, results, cuda, peak_tflops) -> None:
    where = "bf16 CUDA" if cuda else "fp32 CPU"
    print(
        f"\nOurs vs TRL SDFTTrainer: Qwen3 hidden {shape['hidden']} x {shape['layers']} layers, "
        f"vocab {args.vocab}, LoRA r16, base teacher, {where}; {args.prompts} prompts x n "
        f"{args.n} per step; fixed completions of lognormal lengths (mean {args.mean_len:g}, "
        f"sigma {args.sigma}, cap {args.max_len}); gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'} (ours, trl), on (trl-shipped); "
        f"{args.steps} measured steps after {args.warmup} warm-up"
    )
    memory = "peak CUDA MiB" if cuda else "peak RSS MiB"
    head = f"{'mode':<9}{'who':<13}{'step tok/s':>11}{'train tok/s':>12}{memory:>15}"
    head += f"{'above load':>11}{'prompt/teacher len':>20}"
    head += f"{'tok/CPU s':>11}" if not cuda else ""
    print(head + (f"{'train MFU':>11}" if peak_tflops else ""))
    for mode in args.modes:
        for who in args.contenders:
            r = results.get((mode, who))
            if not r:
                continue
            line = f"{mode:<9}{who:<13}{r['step_tps']:>11.0f}{r['train_tps']:>12.0f}"
            line += f"{r['peak']:>15.0f}{r['above']:>11.0f}"
            line += f"{r['prompt_len']:>11.0f} / {r['teacher_prompt_len']:<6.0f}"
            line += f"{r['cpu_tps']:>11.0f}" if not cuda else ""
            if peak_tflops and r["mfu"] is not None:
                line += f"{100 * r['mfu']:>10.1f}%"
            print(line)
        o = results.get((mode, "ours"))
        for who in ("trl", "trl-shipped"):
            t = results.get((mode, who))
            if o and t:
                print(
                    f"{mode:<9}ours / {who}: step tok/s {o['step_tps'] / t['step_tps']:.2f}x, "
                    f"train tok/s {o['train_tps'] / t['train_tps']:.2f}x (target >= 1.5x), "
                    f"peak {o['peak'] / t['peak']:.2f}x (target <= 0.5x), above load "
                    f"{o['above'] / max(t['above'], 1e-9):.2f}x"
                    + (f", tok/CPU s {o['cpu_tps'] / t['cpu_tps']:.2f}x" if not cuda else "")
                )


if __name__ == "__main__":
    sys.exit(main())
