"""Run a tiny OPSD training from dotted overrides and dump what the distributed tests compare.

Usage (single process, or under ``torchrun`` / ``accelerate launch``)::

    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 tests/dist/run_tiny.py OUT_DIR \
        [--ragged] [--fsdp2] model.tiny_cache_dir=... trainer.batch_size=2 ...

``--ragged`` cuts each completion to a length drawn from its (example id, sample index), so
processes see different loss-token counts (a random tiny model otherwise always runs to
``max_new_tokens``, and a per-process loss normaliser would go unnoticed). ``--fsdp2`` runs
accelerate's FSDP2 path on the CPU: accelerate only routes FSDP for accelerator backends, so the
harness switches the distributed type itself (torch's ``fully_shard`` itself works over gloo).
``--reject`` makes the processor refuse about a third of the completions (by example id and
completion only), so the processes hold unequal numbers of micro-batches.
``--length-reward`` turns on a deterministic reward (the completion's length) for
``loss.reward_weight`` > 0, so the reward path runs without a math grader.
``--vl`` trains the tiny Qwen2.5-VL of ``configs/tiny_vl.yaml`` instead of the tiny text model.
``--uneven-generate`` finally samples with a different ``max_new_tokens`` on each process: under
a sharded model every forward is collective, so this hangs unless generation is synchronised.
``--full-disk-on-main`` makes the main process's checkpoint write fail as a full disk does
(ENOSPC while sealing), the other processes' writes (their FSDP2 shards) untouched; the run
goes through ``opsd_mm.errors.run_command``, as the CLI's does, and returns its exit code.

Each rank writes ``OUT_DIR/rank{r}.pt``: the metrics of every step it ran, the completions it
sampled (example id -> completion ids, per step), its trainable parameters, its EMA teacher
state, and the bytes its parameters and teacher hold (``memory``; a separate teacher's in
``model_teachers``). The tests load these files, so the script itself asserts nothing.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import torch

from opsd_mm import cli
from opsd_mm.cli import build_trainer
from opsd_mm.config import load_config
from opsd_mm.errors import run_command
from opsd_mm.loss.rewards import RewardScore
from opsd_mm.rollout.hf import row_seed
from opsd_mm.types import Rollout, SamplingConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = CONFIGS / "tiny_text.yaml"
TINY_VL = CONFIGS / "tiny_vl.yaml"


def ragged(rollouts_P_G, prompts) -> list[list[Rollout]]:
    """Cut each completion to 1..its length tokens, by (example id, sample index) only."""
    return [
        [
            Rollout(
                r.completion_ids[: 1 + row_seed(0, p.meta["key"], j) % len(r.completion_ids)],
                "length",
            )
            for j, r in enumerate(rs)
        ]
        for p, rs in zip(prompts, rollouts_P_G)
    ]


def reject_some(processor) -> None:
    """Refuse to pair some completions, as a processor does for ones it cannot use."""
    pair = processor.pair

    def pair_or_reject(ex, completion_ids, **kwargs):
        if row_seed(2, f"{ex.id}|{list(completion_ids)}", 0) % 3 == 0:
            raise ValueError(f"test harness rejects a completion of {ex.id}")
        return pair(ex, completion_ids, **kwargs)

    processor.pair = pair_or_reject


def record_completions(trainer, cut: bool) -> list[dict[str, list[list[int]]]]:
    """Wrap the engine so each step's rollouts are kept as {example id: [completion ids]}."""
    steps: list[dict[str, list[list[int]]]] = []
    generate = trainer.engine.generate

    def recording(prompts, n, sampling):
        out = generate(prompts, n, sampling)
        if cut:
            out = ragged(out, prompts)
        steps.append({p.meta["key"]: [r.completion_ids for r in rs] for p, rs in zip(prompts, out)})
        return out

    trainer.engine.generate = recording
    return steps


def fsdp2_cpu_accelerator():
    """An Accelerator on the CPU whose state says FSDP2, so ``prepare`` shards with
    ``fully_shard`` over gloo. Both shared states are switched: constructing
    ``AcceleratorState()`` later re-reads the type from ``PartialState``."""
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
    assert acc.is_fsdp2
    return acc


def full(t: torch.Tensor) -> torch.Tensor:
    """A whole CPU copy (FSDP2 parameters are DTensor shards; gathering is collective)."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu().clone()


class LengthReward:
    """The completion's length / 10: deterministic, and rarely constant within a group."""

    name = "length"

    def __call__(self, examples, completions):
        return [RewardScore(len(c) / 10.0) for c in completions]


def memory(model, teacher) -> dict:
    """Bytes this process holds (distinct storages, local shards) in the student's parameters
    (all, trainable, frozen) and in the student and teacher together, with every FSDP2 unit
    resharded first (so the parameters are the shards, not a gathered root)."""
    from torch.distributed.fsdp import FSDPModule

    from opsd_mm.testing.memory import local, storage_bytes, tensors_in

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    params = dict(model.named_parameters())
    frozen = [n for n, p in params.items() if not p.requires_grad]
    return {
        "student": storage_bytes(params.values()),
        "with_teacher": storage_bytes([*params.values(), *tensors_in(teacher)]),
        "trainable": storage_bytes(p for p in params.values() if p.requires_grad),
        "frozen": storage_bytes(params[n] for n in frozen),
        "frozen_names": frozen,
        "teacher_names": sorted(teacher.weights),
        "teacher_local_numel": sum(local(v).numel() for v in teacher.weights.values()),
        "teacher_numel": sum(v.numel() for v in teacher.weights.values()),
    }


def model_teachers(trainer) -> dict:
    """Per separate teacher (``teacher.kind=model``, ``teachers``): whether it is sharded, the
    bytes this process holds of its weights and of the whole, and a checksum of its whole
    weights (gathered: collective), so the tests can see it is the same, untrained, everywhere."""
    out = {}
    for name, t in trainer.teachers.models.items():
        params = list(t.model.parameters())
        out[name] = {
            "sharded": t.sharded,
            "local_bytes": t.weight_bytes(),
            "bytes": sum(p.numel() * p.element_size() for p in params),
            "checksum": sum(float(full(p).double().sum()) for p in params),
            "requires_grad": any(p.requires_grad for p in params),
        }
    return out


def fill_disk_at_seal() -> None:
    """This process's checkpoint writes fail from now on as on a full disk."""
    from opsd_mm.train import checkpoint as ckpt

    def full(tmp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "state.json"))

    ckpt._seal = full


def main(argv: list[str]) -> int:
    flags = {a for a in argv if a.startswith("--")}
    out_dir, *overrides = [a for a in argv if not a.startswith("--")]
    out_dir = Path(out_dir)
    cfg = load_config(TINY_VL if "--vl" in flags else TINY, ["logging.progress=false", *overrides])
    build_reward = cli.build_reward
    if "--length-reward" in flags:  # restored below: the 1-process runs share the test's process
        cli.build_reward = lambda cfg: LengthReward()
    try:
        trainer = build_trainer(cfg, fsdp2_cpu_accelerator() if "--fsdp2" in flags else None)
    finally:
        cli.build_reward = build_reward
    if "--reject" in flags:
        reject_some(trainer.processor)
    generate = trainer.engine.generate
    completions = record_completions(trainer, cut="--ragged" in flags)
    if "--full-disk-on-main" in flags:
        if trainer.accelerator.is_main_process:
            fill_disk_at_seal()
        return run_command(lambda _: trainer.train() and None, None)
    history = trainer.train()
    acc = trainer.accelerator
    uneven = []
    if "--uneven-generate" in flags:
        example = trainer.stream.examples[0]
        prompt = trainer.processor.student_prompt(example)
        prompt.meta["key"] = example.id
        sampling = SamplingConfig(max_new_tokens=3 + 5 * acc.process_index, seed=1)
        uneven = [len(r.completion_ids) for r in generate([prompt], 2, sampling)[0]]
    model = getattr(trainer.model, "module", trainer.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "metrics": history,
            "completions": completions,
            "uneven_generate_lengths": uneven,
            "params": {n: full(p) for n, p in model.named_parameters() if p.requires_grad},
            "ema": {n: full(v) for n, v in trainer.teacher.ema.items()},
            "num_processes": acc.num_processes,
            "local_process_index": acc.local_process_index,
            "model_class": type(trainer.model).__name__,
            "memory": memory(model, trainer.teacher),
            "model_teachers": model_teachers(trainer),
        },
        out_dir / f"rank{acc.process_index}.pt",
    )
    acc.wait_for_everyone()
    acc.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
