"""Rollout throughput: the vLLM engine against the transformers engine, side by side in one run.

Both engines get the same token-id prompts and sampling settings (temperature 1, n samples per
prompt, the step's seed); the runs alternate repeat by repeat so machine noise hits both alike.
The script prints the median wall time and completion tokens per second of each engine, their
ratio, and the time of one vLLM weight sync from the HF model. Run it in the vLLM environment:

    .venv-vllm/bin/python bench/rollout.py            # CPU: the tiny text model
    .venv-vllm/bin/python bench/rollout.py --model qwen3-1.7b --prompts 64 --prompt-len 256 \
        --max-new-tokens 256                          # GPU: a random Qwen3-1.7B-shaped model

The tiny model (0.4 M parameters) measures engine overheads more than model FLOPs; on a GPU
the 1.7B-shaped model is the number that matters for training.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from opsd_mm.config import RolloutConfig
from opsd_mm.model.tiny import resolve_tiny
from opsd_mm.rollout.hf import HFEngine
from opsd_mm.types import Prompt, SamplingConfig

# Qwen3-1.7B's shape (random weights: throughput does not depend on their values).
QWEN3_1_7B = dict(
    vocab_size=151_936,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40_960,
    tie_word_embeddings=True,
)


def build_model_dir(name: str, workdir: Path, dtype: torch.dtype) -> Path:
    """A checkpoint directory: the tiny model, or a random model of a real shape that borrows
    the tiny tokenizer (prompts are token ids; the tokenizer only has to load)."""
    tiny = resolve_tiny("text", workdir / "tiny")
    if name == "tiny":
        return tiny
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = workdir / name
    config = Qwen3Config(**QWEN3_1_7B, eos_token_id=2, pad_token_id=0, bos_token_id=0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def make_prompts(n: int, length: int, low: int, high: int, seed: int = 0) -> list[Prompt]:
    rng = random.Random(seed)
    return [
        Prompt(input_ids=[rng.randrange(low, high) for _ in range(length)], meta={"key": f"p{i}"})
        for i in range(n)
    ]


def timed(engine, prompts, n: int, sampling: SamplingConfig) -> tuple[float, int]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    rollouts_P_G = engine.generate(prompts, n, sampling)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    tokens = sum(len(r.completion_ids) for rs in rollouts_P_G for r in rs)
    return time.perf_counter() - start, tokens


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--model", choices=["tiny", "qwen3-1.7b"], default="qwen3-1.7b" if cuda else "tiny"
    )
    ap.add_argument("--prompts", type=int, default=64 if cuda else 16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=256 if cuda else 64)
    ap.add_argument("--max-new-tokens", type=int, default=256 if cuda else 64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from opsd_mm.rollout.vllm_engine import VLLMEngine

    dtype = torch.bfloat16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model_dir(args.model, Path(tmp), dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        eos, pad, first_plain, tok_vocab = [2, 0], 0, 9, 1400  # the tiny tokenizer's ids
        hf = HFEngine(model, pad_token_id=pad, eos_token_ids=eos)
        max_len = args.prompt_len + args.max_new_tokens + 8
        vllm_engine = VLLMEngine(
            str(path),
            RolloutConfig(engine="vllm", gpu_memory_utilization=args.gpu_memory_utilization),
            dtype=str(dtype).removeprefix("torch."),
            seed=0,
            max_model_len=max_len,
            eos_token_ids=eos,
        )
        prompts = make_prompts(args.prompts, args.prompt_len, first_plain, tok_vocab)
        engines = {"hf": hf, "vllm": vllm_engine}
        warm = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=0)
        for engine in engines.values():  # first calls compile kernels / allocate caches
            engine.generate(prompts[:2], args.n, warm)

        walls: dict[str, list[float]] = {k: [] for k in engines}
        tokens: dict[str, list[int]] = {k: [] for k in engines}
        for rep in range(args.repeats):
            sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=rep)
            for name, engine in engines.items():
                wall, count = timed(engine, prompts, args.n, sampling)
                walls[name].append(wall)
                tokens[name].append(count)
        start = time.perf_counter()
        vllm_engine.sync_weights(model)
        sync_s = time.perf_counter() - start

    rows = args.prompts * args.n
    print(
        f"\nmodel={args.model} device={device} dtype={str(dtype).removeprefix('torch.')} "
        f"prompts={args.prompts} n={args.n} prompt_len={args.prompt_len} "
        f"max_new_tokens={args.max_new_tokens} rows={rows} repeats={args.repeats} "
        f"torch_threads={torch.get_num_threads()} (vLLM generates with 1 on a CPU)"
    )
    print(f"{'engine':8s} {'median s':>10s} {'tokens':>8s} {'tokens/s':>10s}")
    rate = {}
    for name in engines:
        wall = statistics.median(walls[name])
        count = statistics.median(tokens[name])
        rate[name] = sum(tokens[name]) / sum(walls[name])
        print(f"{name:8s} {wall:10.3f} {count:8.0f} {rate[name]:10.1f}")
    print(f"vllm/hf tokens/s ratio: {rate['vllm'] / rate['hf']:.2f}x")
    print(f"vllm weight sync from the HF model: {sync_s:.3f} s")


if __name__ == "__main__":
    main()
