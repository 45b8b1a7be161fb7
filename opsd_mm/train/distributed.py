"""The run's Accelerator, and what the trainer supports under each accelerate distributed
engine, checked at start-up."""

from __future__ import annotations

from typing import Any

import torch

from opsd_mm.config import ConfigError, RunConfig, teacher_key, teacher_specs
from opsd_mm.errors import UserError


class PeerFailedError(UserError):
    """Work that only some processes do (the main process writes a checkpoint) failed on
    another process; this one stops with it instead of waiting at the next barrier."""


def raise_together(error: BaseException | None, what: str) -> None:
    """Collective: every process calls it after work that may have failed on some of them
    (``error``: this process's failure, or None). If any failed, every process raises - the
    failing ones their own error (traceback kept), the others :class:`PeerFailedError` naming
    the first failing process and its error. Why: when one process raises while the others wait
    at a barrier, they learn of it only from the transport - over NCCL after the collective
    timeout, over gloo as a "connection closed by peer" traceback - and never say what failed.
    Without a process group (one process) it only re-raises ``error``."""
    import torch.distributed as dist

    reports: list[str | None] = []
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        reports = [None] * dist.get_world_size()
        mine = None if error is None else f"{type(error).__name__}: {error}"[:400]
        dist.all_gather_object(reports, mine)
    if error is not None:
        raise error
    for rank, report in enumerate(reports):
        if report is not None:
            raise PeerFailedError(f"{what} failed on process {rank} ({report}); stopping with it")


def make_accelerator(cfg: RunConfig) -> Any:
    """The run's one ``accelerate.Accelerator``: ``trainer.mixed_precision`` (``auto``: bf16 on
    CUDA, none on CPU), the trackers of ``logging.report_to``, ``run_dir`` as project dir.
    Made once per run by ``opsd_mm.train.build`` and handed to the trainer."""
    from accelerate import Accelerator

    mp = cfg.trainer.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    return Accelerator(
        mixed_precision=mp, log_with=cfg.logging.report_to or None, project_dir=cfg.run_dir
    )


def check_distributed_support(cfg: RunConfig, acc: Any) -> None:
    """Refuse at start-up, naming the setting, what the trainer cannot yet do under a sharding
    engine - rather than a DTensor error at step 1 or a broken checkpoint hours later.

    DDP and FSDP2 support everything (FSDP2: LoRA and full fine-tuning, every teacher kind, the
    fused loss, sharded checkpoints) but a model teacher's CPU offload under FSDP2, which shards
    that teacher instead. DeepSpeed is not supported and no config for it ships:
    FSDP2 is the sharded path. Why: accelerate steps the DeepSpeed engine inside
    ``backward()``, which conflicts with the trainer's own micro-batch accumulation, and it cannot
    be tested on the CPU (DeepSpeed 0.19.8 with DS_ACCELERATOR=cpu trains over gloo, but
    accelerate then reports num_processes=1 and process_index=0 on every rank).
    """
    from accelerate.utils import DistributedType

    if cfg.rollout.async_ and acc.num_processes > 1:
        raise ConfigError(
            f"rollout.async=true runs with one trainer process, not {acc.num_processes}: the "
            "batch generated ahead, which a checkpoint records, is one process's; launch one "
            "process or set rollout.async=false"
        )
    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError(
            "DeepSpeed is not supported: FSDP2 is the sharded path (parameters, gradients and "
            "optimizer state sharded, with the trainer's own micro-batch accumulation, which "
            "DeepSpeed's engine would replace); launch with configs/accelerate/fsdp2.yaml, or "
            "configs/accelerate/ddp.yaml when the model fits one device"
        )
    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        raise ConfigError(
            "FSDP1 is not supported; use fsdp_version: 2 (configs/accelerate/fsdp2.yaml)"
        )
    if acc.distributed_type == DistributedType.FSDP:
        for name, spec in teacher_specs(cfg).items():
            if spec.kind == "model" and spec.model.offload:
                raise ConfigError(
                    f"{teacher_key(cfg, name)}.model.offload=true is not supported under FSDP2: "
                    "the teacher is sharded like the student there (each process holds 1/N of "
                    "its weights); set it false"
                )
