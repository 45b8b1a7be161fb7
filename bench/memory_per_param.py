"""Bytes per model parameter that each process holds, by engine and teacher, measured from the
tensors of a real 2-process run (tiny text and Qwen2.5-VL models, CPU, gloo, fp32).

    python bench/memory_per_param.py [--modes ddp_full_fixed ...] [--json rows.json]

For each mode, 2 processes train one step. Each process counts, from the distinct storages of
the tensors it holds (``opsd_mm.testing.memory``; a DTensor's local shard only):
- params: the registered parameters (every FSDP2 unit resharded first);
- grads: ``.grad`` of every parameter, taken just before the optimizer step (afterwards they
  are set to None);
- optimizer: the AdamW state after the step (exp_avg, exp_avg_sq, step);
- teacher: what the teacher adds on top of the student's parameters (its EMA or fixed copy
  of the trainable parameters; shared tensors count 0);
and divides by the model's parameter count (whole, not per shard; LoRA adapters included).

Not counted: activations, DDP's gradient buckets (by default DDP reduces through flat buffers
as large as the gradients), FSDP2's transient all-gather buffers, allocator caching. On a GPU
with ``model.dtype: auto`` the parameters, gradients, AdamW moments and teacher tensors are all
bf16, so each column is half the fp32 figure printed here.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NPROC = 2
TEXT, VL = "tiny_text.yaml", "tiny_vl.yaml"
TINY_NAME = {TEXT: "text", VL: "qwen2.5-vl"}  # the model each config trains
FULL = ("model.lora.enabled=false",)
# The VL rows: full fine-tuning of the language model, vision tower and projector frozen.
VL_FULL = (*FULL, "model.train_vision_tower=false", "model.train_projector=false")
MODES: dict[str, tuple[str, bool, tuple[str, ...]]] = {  # name -> (config, FSDP2?, overrides)
    "ddp_lora_fixed": (TEXT, False, ("teacher.kind=fixed",)),
    "ddp_full_fixed": (TEXT, False, (*FULL, "teacher.kind=fixed")),
    "ddp_full_live": (TEXT, False, (*FULL, "teacher.kind=live")),
    "ddp_full_ema": (TEXT, False, (*FULL, "teacher.kind=ema")),
    "fsdp2_full_fixed": (TEXT, True, (*FULL, "teacher.kind=fixed")),
    "fsdp2_full_ema": (TEXT, True, (*FULL, "teacher.kind=ema")),
    "ddp_vl_full_fixed": (VL, False, (*VL_FULL, "teacher.kind=fixed")),
    "fsdp2_vl_full_fixed": (VL, True, (*VL_FULL, "teacher.kind=fixed")),
}
COLUMNS = ("params", "grads", "optimizer", "teacher")


def fsdp2_cpu_accelerator():
    """An Accelerator on the CPU whose state says FSDP2 (accelerate routes FSDP only for
    accelerator backends; ``fully_shard`` itself works over gloo). As tests/dist/run_tiny.py."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    acc = Accelerator(cpu=True, mixed_precision="no")
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
    )
    acc.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP
    return acc


def worker(mode: str, out: Path, cache: str | None) -> None:
    """One process of one mode: train one step, measure, write ``out/rank{r}.json``."""
    from torch.distributed.fsdp import FSDPModule

    from opsd_mm.cli import build_trainer
    from opsd_mm.config import load_config
    from opsd_mm.model.forward import unwrap
    from opsd_mm.testing.memory import storage_bytes, tensors_in

    config, fsdp2, overrides = MODES[mode]
    cfg = load_config(
        ROOT / "configs" / config,
        [
            f"run_dir={out / 'run'}",
            "logging.progress=false",
            "trainer.max_steps=1",
            "trainer.save_every=0",
            "rollout.max_new_tokens=8",
            *([f"model.tiny_cache_dir={cache}"] if cache else []),
            *overrides,
        ],
    )
    trainer = build_trainer(cfg, fsdp2_cpu_accelerator() if fsdp2 else None)
    model = unwrap(trainer.model)
    grads: dict[str, int] = {}

    def before_step(optimizer, args, kwargs) -> None:
        grads["bytes"] = storage_bytes(p.grad for p in model.parameters() if p.grad is not None)

    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    optimizer.register_step_pre_hook(before_step)
    trainer.train()
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    params = list(model.parameters())
    student = storage_bytes(params)
    state = [t for s in optimizer.state.values() for t in s.values()]
    row = {
        "model_params": sum(p.numel() for p in params),  # a DTensor's numel is the whole one
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "params": student,
        "grads": grads["bytes"],
        "optimizer": storage_bytes(t for t in state if isinstance(t, torch.Tensor)),
        "teacher": storage_bytes([*params, *tensors_in(trainer.teacher)]) - student,
    }
    rank = trainer.accelerator.process_index
    (out / f"rank{rank}.json").write_text(json.dumps(row))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, out: Path, cache: str | None) -> list[dict]:
    """Start NPROC worker processes over gloo (the variables torchrun sets); their rows. The
    tiny model is built here first, so the processes do not race to build it."""
    from opsd_mm.model.tiny import resolve_tiny

    resolve_tiny(TINY_NAME[MODES[mode][0]], cache)
    out.mkdir(parents=True)
    port = str(_free_port())
    procs = []
    for rank in range(NPROC):
        env = {
            **os.environ,
            "ACCELERATE_USE_CPU": "true",
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "WORLD_SIZE": str(NPROC),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(NPROC),
        }
        cmd = [sys.executable, __file__, "--worker", mode, "--out", str(out)]
        cmd += ["--tiny-cache-dir", cache] if cache else []
        log = (out / f"log{rank}.txt").open("w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    for p in procs:
        p.wait(timeout=900)
    for rank, p in enumerate(procs):
        if p.returncode != 0:
            tail = (out / f"log{rank}.txt").read_text()[-3000:]
            raise SystemExit(f"{mode}: process {rank} exited {p.returncode}:\n{tail}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(NPROC)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--tiny-cache-dir", help="model.tiny_cache_dir (default: the usual cache)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, Path(args.out), args.tiny_cache_dir)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            results[mode] = launch(mode, Path(tmp) / mode, args.tiny_cache_dir)
    print(f"bytes per model parameter held by each process ({NPROC} processes, CPU, fp32; the max")
    print("over processes; bf16 on a GPU: half of each figure)\n")
    header = f"{'mode':<20}" + "".join(f"{c:>10}" for c in (*COLUMNS, "total"))
    print(header + f"{'trainable':>11}{'model params':>14}")
    for mode, rows in results.items():
        n = rows[0]["model_params"]
        per = {c: max(r[c] for r in rows) / n for c in COLUMNS}
        cells = "".join(f"{per[c]:>10.2f}" for c in COLUMNS)
        trainable = f"{rows[0]['trainable_params'] / n:>11.1%}"
        print(f"{mode:<20}{cells}{sum(per.values()):>10.2f}{trainable}{n:>14,}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
