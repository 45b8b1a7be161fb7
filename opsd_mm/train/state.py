"""A run's state across processes and restarts: the run directory's claim, the settings a
checkpoint records, and loading the newest checkpoint that loads.

- :func:`claim_run_dir`: one run per run_dir (``opsd_mm/train/run_dir.py``). A fresh run refuses
  a directory that holds another run's checkpoints or metrics, unless ``trainer.overwrite``
  (then it is renamed to ``<run_dir>.replaced-<time>``), and writes a new run id; a resumed
  run keeps the directory's id.
- :func:`recorded_settings` / :func:`apply_settings`: the trainer settings a checkpoint records;
  on resume the config wins, never silently (each changed setting is logged).
- :func:`load_newest`: the newest checkpoint of this run that loads; one that does not (a
  truncated weight file, garbled JSON) is skipped for the previous one, with a warning naming
  both, and renamed ``corrupt-step-*``; when none loads, the error names them all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from opsd_mm.config import RunConfig
from opsd_mm.train import checkpoint as ckpt
from opsd_mm.train import run_dir as rundir

log = logging.getLogger(__name__)

GLOBAL_BATCH = "global batch (trainer.batch_size x processes)"


def claim_run_dir(cfg: RunConfig, accelerator: Any) -> str | None:
    """Claim ``run_dir`` for this run (see the module docstring) on every process; the run id
    (None on the other processes of a fresh run: only the main one writes it)."""
    tc, acc, run_dir = cfg.trainer, accelerator, Path(cfg.run_dir)
    rundir.check_writable(run_dir)  # on every process: all raise, none waits
    run_id = None
    if tc.resume:
        run_id = rundir.read_run_id(run_dir)
    elif not tc.overwrite:
        rundir.check_fresh(run_dir)  # on every process: all raise, none waits
    acc.wait_for_everyone()
    if acc.is_main_process:
        if not tc.resume and tc.overwrite:
            moved = rundir.move_aside(run_dir)
            if moved is not None:
                log.warning("trainer.overwrite: moved the previous %s to %s", run_dir, moved)
        if run_id is None:
            run_id = rundir.new_run_id()
            rundir.write_run_id(run_dir, run_id)
    acc.wait_for_everyone()
    return run_id


def recorded_settings(cfg: RunConfig, num_processes: int) -> dict[str, Any]:
    """The trainer settings a checkpoint records, compared on resume."""
    tc = cfg.trainer
    return {
        "trainer.lr": tc.lr,
        "trainer.lr_schedule": tc.lr_schedule,
        "trainer.warmup_steps": tc.warmup_steps,
        "trainer.schedule_steps": tc.schedule_steps or tc.max_steps,
        "trainer.weight_decay": tc.weight_decay,
        "trainer.adam_beta1": tc.adam_beta1,
        "trainer.adam_beta2": tc.adam_beta2,
        GLOBAL_BATCH: tc.batch_size * num_processes,
        "rollout.n": cfg.rollout.n,
    }


def apply_settings(
    saved: dict[str, Any],
    cfg: RunConfig,
    num_processes: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    path: Path,
) -> None:
    """The config wins over what the checkpoint restored, never silently: each changed
    setting is logged with its old and new value. The optimizer's lr, weight decay and betas
    are set from the config, and the lr is recomputed from the config's schedule at the
    restored step. A changed batch (or rollout.n) applies from the next step: the data
    position is an example count, so the next step reads the examples after the last one
    the checkpoint consumed."""
    now = recorded_settings(cfg, num_processes)
    if "trainer.lr" not in saved and scheduler.base_lrs:  # checkpoints before settings
        saved = {**saved, "trainer.lr": scheduler.base_lrs[0]}
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
    for key, (old, new) in changed.items():
        log.warning(
            "resuming %s: %s changed from %s (checkpoint) to %s (config); the config's value "
            "applies from step %d",
            path,
            key,
            old,
            new,
            step + 1,
        )
    tc = cfg.trainer
    scheduler.base_lrs = [tc.lr for _ in scheduler.base_lrs]
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = tc.lr
        group["lr"] = tc.lr * fn(scheduler.last_epoch)
        group["weight_decay"] = tc.weight_decay
        group["betas"] = (tc.adam_beta1, tc.adam_beta2)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def saved_settings(state: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint's ``state.json`` records (older ones recorded the global
    batch apart)."""
    settings = dict(state.get("settings") or {})
    if "global_batch_size" in state:
        settings.setdefault(GLOBAL_BATCH, state["global_batch_size"])
    return settings


def load_newest(
    run_dir: Path,
    run_id: str | None,
    load: Callable[[Path], tuple[dict[str, Any], dict[str, torch.Tensor] | None]],
    accelerator: Any,
) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor] | None] | None:
    """(path, ``state.json``, teacher state) of the newest checkpoint of run ``run_id`` in
    ``run_dir`` that ``load`` restores (falling back past unloadable ones, see the module
    docstring); None when the run has no checkpoint. Every process loads the same files."""
    ours = [
        p
        for p in ckpt.list_checkpoints(run_dir)
        if ckpt.checkpoint_run_id(p) in (run_id, None)  # None: unreadable or older
    ]
    if not ours:
        return None
    failed: list[tuple[Path, Exception]] = []
    for path in reversed(ours):
        try:
            state, teacher_state = load(path)
            break
        except Exception as e:  # noqa: BLE001 - any unreadable file: try the previous one
            failed.append((path, e))
    else:
        raise RuntimeError(
            f"trainer.resume: no checkpoint in {run_dir} loads: "
            + "; ".join(f"{p.name}: {type(e).__name__}: {e}" for p, e in failed)
        )
    if failed:
        log.warning(
            "checkpoint %s cannot be loaded (%s: %s); resuming from the previous complete "
            "checkpoint %s instead%s",
            failed[0][0],
            type(failed[0][1]).__name__,
            str(failed[0][1])[:200],
            path,
            f" ({len(failed) - 1} more unloadable)" if len(failed) > 1 else "",
        )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for bad, _ in failed:
                ckpt.set_aside_corrupt(bad)
    return path, state, teacher_state
