"""Generation server against colocated vLLM, side by side in one run, and weight-sync cost.

Run in the vLLM environment (the client half needs no vLLM, but the colocated engine does):

    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python bench/server_rollout.py

Prints completion tokens/s of the same seeded requests through ``opsd-mm serve`` (a subprocess
on loopback) and through an in-process ``VLLMEngine`` (alternating repeats, medians), then the
weight sync: the tiny model's full sync (write + HTTP + reload, overhead-bound), and the two
parts that scale with size, timed on ``--sync-mib`` of random fp32 tensors: writing the
safetensors, and reading them back (what the server's reload does before copying into place).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from opsd_mm.config import ProcessorConfig, RolloutConfig
from opsd_mm.model.tiny import resolve_tiny
from opsd_mm.processors import build_processor
from opsd_mm.rollout.client import ServerEngine
from opsd_mm.rollout.shared import save_sync_weights
from opsd_mm.types import Example, SamplingConfig


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tokens(rollouts_P_G) -> int:
    return sum(len(r.completion_ids) for rs in rollouts_P_G for r in rs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sync-mib", type=int, default=1024)
    args = ap.parse_args()

    path = str(resolve_tiny("text"))
    proc = build_processor(ProcessorConfig(), path, "qwen3")
    prompts = []
    for i in range(args.prompts):
        p = proc.student_prompt(Example(id=f"b{i}", question=f"Compute {i} + {i * 7 % 13}."))
        p.meta["key"] = f"b{i}"
        prompts.append(p)
    port = _port()
    cmd = [
        sys.executable,
        "-m",
        "opsd_mm.cli",
        "serve",
        path,
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
    ]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in server.stdout:
        if line.startswith("serving "):
            break
    try:
        from opsd_mm.rollout.vllm_engine import VLLMEngine

        client = ServerEngine(
            f"http://127.0.0.1:{port}",
            tempfile.mkdtemp(),
            eos_token_ids=proc.eos_token_ids,
            suppress_token_ids=proc.suppress_token_ids,
        )
        local = VLLMEngine(
            path,
            RolloutConfig(engine="vllm"),
            dtype="float32",
            max_model_len=512,
            suppress_token_ids=proc.suppress_token_ids,
            eos_token_ids=proc.eos_token_ids,
        )
        times: dict[str, list[float]] = {"server": [], "colocated": []}
        tokens = {}
        for rep in range(args.repeats + 1):  # the first repeat warms both up, uncounted
            sampling = SamplingConfig(1.0, max_new_tokens=args.max_new_tokens, seed=rep)
            for name, engine in (("server", client), ("colocated", local)):
                t = time.perf_counter()
                out = engine.generate(prompts, args.n, sampling)
                if rep:
                    times[name].append(time.perf_counter() - t)
                    tokens[name] = _tokens(out)
        for name, ts in times.items():
            med = statistics.median(ts)
            print(
                f"{name:10s} {tokens[name]} tokens in {med:.3f} s: {tokens[name] / med:,.0f} tok/s"
            )
        ratio = statistics.median(times["colocated"]) / statistics.median(times["server"])
        print(f"server / colocated throughput: {ratio:.2f}x")

        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        syncs = []
        for _ in range(args.repeats):
            client.sync_weights(model)
            syncs.append(client.last_sync_s)
        print(
            f"tiny sync ({client.last_sync_bytes / 2**20:.2f} MiB, write+HTTP+reload): "
            f"{statistics.median(syncs) * 1e3:.0f} ms median"
        )
        client.release()
    finally:
        server.kill()

    from safetensors.torch import load_file

    n = args.sync_mib * 2**20 // 4 // (4096 * 4096)
    big = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(4096, 4096)) for _ in range(n))
    gib = n * 4096 * 4096 * 4 / 2**30
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        save_sync_weights(big, d)
        write = time.perf_counter() - t
        t = time.perf_counter()
        for f in sorted(Path(d).glob("*.safetensors")):
            sum(v.sum().item() for v in load_file(f).values())  # touch every page
        read = time.perf_counter() - t
    print(
        f"{gib:.2f} GiB random fp32: write {write / gib:.2f} s/GiB, read back "
        f"{read / gib:.2f} s/GiB (page cache; a disk or network filesystem adds its own)"
    )


if __name__ == "__main__":
    main()
