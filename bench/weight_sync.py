"""Weight sync to the generation server: the file transport against a process group, side by side.

Run from the main environment, with the vLLM environment beside it (``make venv venv-vllm``):

    .venv/bin/python bench/weight_sync.py                      # CPU: file vs gloo
    .venv/bin/python bench/weight_sync.py --transports file nccl --server-gpu 1   # two GPUs

One ``opsd-mm serve`` (the vLLM environment) holds a Qwen3-shaped model of ``--hidden`` x
``--layers`` (the tiny tokenizer, random weights, fp32); this process loads the same model and
syncs it ``--repeats`` times through each transport in turn, with a :class:`ServerEngine` per
transport, exactly as the trainer does (``rollout.server_transport``). Printed per transport:
the seconds of each sync as the trainer waits for it, the server's own reload time (vLLM's
in-place load: the same work in both), seconds per GB of weights, and the ratio to ``file``.
The first sync of each (which forms the group, or creates the directory) is printed apart and
left out of the mean.

Between syncs the weights are perturbed and, after the last one, the server's greedy
completion is compared with the trainer's (HF) on the same prompt: a sync that dropped or
mis-named tensors would fail there rather than look fast.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from opsd_mm.rollout.client import ServerEngine
from opsd_mm.testing.server import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def build_model(out: Path, hidden: int, layers: int) -> Path:
    """The tiny tokenizer with a wider, deeper Qwen3 (head_dim 64, GQA 2:1)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opsd_mm.model.tiny.text import SPECIAL_TOKENS, train_tiny_tokenizer

    tok = train_tiny_tokenizer(0)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    heads = hidden // 64
    config = Qwen3Config(
        vocab_size=-(-len(tok) // 64) * 64,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        dtype="float32",
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def greedy_equal(engine: ServerEngine, model: torch.nn.Module, eos: list[int]) -> bool:
    from opsd_mm.types import Prompt, SamplingConfig

    prompt_ids = list(range(5, 25))
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=12)
    served = engine.generate([Prompt(input_ids=prompt_ids, meta={"key": "p"})], 1, sampling)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False, eos_token_id=eos
        )
    local = out[0, len(prompt_ids) :].tolist()
    local = local[: next((i + 1 for i, t in enumerate(local) if t in eos), len(local))]
    return served[0][0].completion_ids == local


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--transports", nargs="+", default=["file", "gloo"])
    ap.add_argument("--server-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--server-gpu", help="CUDA_VISIBLE_DEVICES for the server (nccl)")
    ap.add_argument("--sync-dir", help="where the file transport writes (default: a temp dir)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="opsd-weight-sync-"))
    path = build_model(work / "model", args.hidden, args.layers)
    device = "cuda" if "nccl" in args.transports else "cpu"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    gb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e9
    eos = [int(model.config.eos_token_id)]

    # With --server-gpu the server's process sees only its GPU.
    prefix = [] if args.server_gpu is None else ["env", f"CUDA_VISIBLE_DEVICES={args.server_gpu}"]
    server = ServerProcess(path, python=args.server_python, max_model_len=256, prefix=prefix)
    server.start()
    results: dict[str, dict] = {}
    try:
        for transport in args.transports:
            engine = ServerEngine(
                server.url,
                Path(args.sync_dir or work / "sync"),
                eos_token_ids=eos,
                transport=transport,
            )  # one run per transport: each releases the server for the next
            times, server_s = [], []  # as the trainer waits; vLLM's load inside the server
            for _ in range(args.repeats + 1):
                with torch.no_grad():  # new values each time: nothing can be cached
                    for p in model.parameters():
                        p.mul_(1.0 + 1e-3)
                start = time.perf_counter()
                engine.sync_weights(model)
                times.append(time.perf_counter() - start)
                server_s.append(engine.last_server_load_s)
            first, times, server_s = times[0], times[1:], server_s[1:]
            results[transport] = {
                "sync_s": statistics.mean(times),
                "server_s": statistics.mean(server_s),
                "all": times,
                "first": first,
                "bytes": engine.last_sync_bytes,
                "parity": greedy_equal(engine, model, eos),
            }
            engine.release()
    finally:
        server.stop()

    print(
        f"model: Qwen3 hidden {args.hidden} x {args.layers} layers, "
        f"{gb:.3f} GB of weights (fp32); {args.repeats} syncs each; trainer on {device}"
    )
    base = results.get("file", {}).get("sync_s")
    print(
        f"{'transport':9s} {'sync s':>8s} {'s/GB':>8s} {'vs file':>8s} {'vLLM load':>9s}  "
        "greedy==HF  each (s)"
    )
    for name, r in results.items():
        ratio = f"{base / r['sync_s']:7.2f}x" if base else "      -"
        each = " ".join(f"{t:.3f}" for t in r["all"])
        extra = f"  (first sync, left out: {r['first']:.3f} s)"
        print(
            f"{name:9s} {r['sync_s']:8.3f} {r['sync_s'] / gb:8.3f} {ratio} {r['server_s']:9.3f}  "
            f"{str(r['parity']):10s}  {each}{extra}"
        )


if __name__ == "__main__":
    main()
