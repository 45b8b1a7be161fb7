"""Crash-safe checkpoints: written into a temporary directory, then renamed into place.

A checkpoint directory ``checkpoints/step-000002/`` exists only once complete (``os.replace`` of
a finished temporary directory is atomic on one filesystem), so a crash mid-write leaves a
``.tmp-*`` directory that resume ignores and the next save removes. Contents:
    model/               save_pretrained output (the LoRA adapter, or the full model)
    optimizer.pt         optimizer state (tensors and plain containers: loads with weights_only)
    scheduler.pt         LR scheduler state
    teacher.safetensors  EMA teacher parameters (when the teacher is ``ema``)
    rng.pt               torch / CUDA / python RNG states, one per process
    state.json           step, run id, data position, counters, the trainer settings it ran with

Every checkpoint records the id of the run that wrote it (``state.json`` ``run_id``, see
``opsd_mm/train/run_dir.py``); pruning removes only checkpoints of the same run. A checkpoint that
fails to load is renamed ``corrupt-step-*`` (out of the ``step-*`` namespace, kept for
inspection) by :func:`set_aside_corrupt`, so resume can fall back to the previous one.

Under FSDP2 (:func:`save_sharded_checkpoint`) the weights, optimizer state and EMA teacher are
sharded, so ``model/``, ``optimizer.pt`` and ``teacher.safetensors`` are replaced by one
``torch.distributed.checkpoint`` (DCP) directory, ``sharded/``, that every process writes its
shard into (keys ``model``, ``optimizer``, ``teacher``; the trainable parameters only, and the
optimizer state keyed by parameter name). DCP reshards on load, so such a checkpoint resumes on
any process count, a plain 1-process module included (:func:`load_sharded_checkpoint`). The rest
(scheduler, RNG, ``state.json``), the temporary directory, the rename and the pruning are as
below, done by the main process between barriers.

A write that fails part-way (a full disk, a read-only or vanished directory) removes the partial
``.tmp-*`` directory at once, so the space it held is free again and the newest complete checkpoint
is untouched; a failure of the disk's is :class:`CheckpointWriteError`, one line on the command
line naming that checkpoint (exit 2).

Only the main process writes; under DDP the weights and optimizer state are the same on every
process, and the per-process RNG states are gathered to it first. Removing a checkpoint (pruning,
or replacing one of the same step) renames it to ``.tmp-*`` before deleting, so a crash never
leaves a half-deleted directory that still looks complete.

Test hook: with ``OPSD_TEST_STALL_CHECKPOINT=<step>`` in the environment, saving that step stops
half-way (model and optimizer written, or under FSDP2 every process's shard, ``state.json``
not) and sleeps, so a test can kill the
process mid-write (tests/train/test_crash_resume.py, tests/train/test_crash_resume_sharded.py). Nothing else reads the variable.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from opsd_mm.errors import UserError, user_os_error

STEP_PREFIX = "step-"
SHARDED_DIR = "sharded"
STALL_ENV = "OPSD_TEST_STALL_CHECKPOINT"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (``step-<digits>`` directories holding ``state.json``;
    a copy such as ``step-000004.bak`` is not one)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith(STEP_PREFIX)
        and p.name[len(STEP_PREFIX) :].isdigit()
        and (p / "state.json").exists()
    ]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_run_id(path: Path) -> str | None:
    """The run id a checkpoint was written by (None: unreadable, or written before run ids)."""
    try:
        return json.loads((path / "state.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def set_aside_corrupt(path: Path) -> Path:
    """Rename an unloadable checkpoint to ``corrupt-step-*`` so it is neither resumed from nor
    counted by pruning, but stays on disk for inspection."""
    dest = path.with_name(f"corrupt-{path.name}")
    if dest.exists():
        shutil.rmtree(dest, ignore_errors=True)
    os.replace(path, dest)
    return dest


def rng_state() -> dict[str, Any]:
    """This process's RNG states (gathered from every process into ``rng.pt``)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    state["python_version"] = random.getstate()[0]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _remove(path: Path) -> None:
    """Delete a directory: first renamed out of the ``step-*`` namespace (atomic), so a crash
    mid-delete leaves a ``.tmp-*`` leftover rather than a partial checkpoint."""
    trash = path.with_name(f".tmp-del-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    teacher_state: dict[str, torch.Tensor] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
    keep_last: int = 2,
    run_id: str | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and prune to the newest ``keep_last`` of run
    ``run_id`` (checkpoints of other runs are never removed).

    ``rng_states``: one entry per process (default: this process's only). A write that fails
    (a full disk, say) removes the partial checkpoint; one that fails for a reason of the
    disk's raises :class:`CheckpointWriteError` naming the last complete checkpoint."""
    root = checkpoint_dir(run_dir)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        model.save_pretrained(tmp / "model", safe_serialization=True)
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        if os.environ.get(STALL_ENV) == str(step):
            time.sleep(3600)  # test hook (module docstring): killed here, half-written
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        _torch_save({"per_process": rng_states or [rng_state()]}, tmp / "rng.pt")
        if teacher_state:
            save_file(teacher_state, str(tmp / "teacher.safetensors"))
        _seal(tmp, step, state, run_id)
    except Exception as e:
        _write_failed(e, run_dir, step, tmp, run_id)
        raise
    return _publish(run_dir, step, tmp, keep_last=keep_last, run_id=run_id)


class CheckpointWriteError(UserError):
    """A checkpoint could not be written for a reason of the disk's (full, read-only, a quota):
    the partial checkpoint is removed and the previous one is intact, so the run can resume."""


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file object: a failed write then carries the OSError
    (ENOSPC...), which ``torch.save`` to a path hides behind an "unexpected pos" RuntimeError."""
    with path.open("wb") as fh:
        torch.save(obj, fh)


def _write_failed(
    e: BaseException, run_dir: str | Path, step: int, tmp: Path, run_id: str | None
) -> None:
    """Remove the partial checkpoint ``tmp`` (it would hold the space the next try needs), and
    raise :class:`CheckpointWriteError` when ``e`` is about the disk; otherwise return, and the
    caller re-raises ``e`` (a bug keeps its traceback)."""
    shutil.rmtree(tmp, ignore_errors=True)
    os_error = user_os_error(e)
    if os_error is None:
        return
    ours = [p for p in list_checkpoints(run_dir) if checkpoint_run_id(p) == run_id]
    where = f" ({os_error.filename})" if os_error.filename else ""
    kept = (
        f"the last complete checkpoint {ours[-1]} is intact"
        if ours
        else "no earlier checkpoint of this run exists (--resume then starts at step 0)"
    )
    raise CheckpointWriteError(
        f"checkpoint {checkpoint_dir(run_dir) / step_name(step)} could not be written: "
        f"{os_error.strerror}{where}; the partial checkpoint was removed and {kept}; free "
        "space (or fix the directory), then continue with --resume"
    ) from e


def _seal(tmp: Path, step: int, state: dict[str, Any], run_id: str | None) -> None:
    """Write ``state.json`` into the finished ``tmp`` and fsync every file."""
    # state.json last: its presence marks the content complete even before the rename.
    (tmp / "state.json").write_text(json.dumps({"step": step, "run_id": run_id, **state}, indent=2))
    for f in tmp.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


def _publish(
    run_dir: str | Path, step: int, tmp: Path, *, keep_last: int, run_id: str | None
) -> Path:
    """Rename the sealed ``tmp`` into place (replacing a checkpoint of the same step), then
    prune."""
    root = checkpoint_dir(run_dir)
    final = root / step_name(step)
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    ours = [p for p in list_checkpoints(run_dir) if checkpoint_run_id(p) == run_id]
    for old in ours[:-keep_last] if keep_last > 0 else []:
        _remove(old)
    return final


def _sharded_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    teacher_state: dict[str, torch.Tensor] | None,
) -> tuple[dict[str, Any], Any]:
    """The DCP state dict (trainable parameters, optimizer state by parameter name, EMA
    tensors; DTensor shards under FSDP2, whole tensors for a plain module) and its options."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
    if teacher_state:
        state["teacher"] = teacher_state
    return state, options


def save_sharded_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    is_main: bool,
    barrier: Callable[[], None],
    settle: Callable[[BaseException | None], None] | None = None,
    teacher_state: dict[str, torch.Tensor] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
    keep_last: int = 2,
    run_id: str | None = None,
) -> Path:
    """:func:`save_checkpoint` for sharded models: called on every process (collective), each
    writes its shard into ``sharded/`` of the one temporary directory; the main process then
    writes the rest and renames it into place after a barrier. ``barrier``: waits for every
    process (``Accelerator.wait_for_everyone``). ``settle(error)``: the barrier after the main
    process's own work, told whether it failed, so that every process raises instead of the
    others waiting (``opsd_mm.train.distributed.raise_together``); by default the main process
    raises before its barrier, which is enough for one process."""
    import torch.distributed.checkpoint as dcp

    def settle_alone(error: BaseException | None) -> None:
        if error is not None:
            raise error
        barrier()

    settle = settle or settle_alone
    root = checkpoint_dir(run_dir)
    tmp = root / f".tmp-{step_name(step)}-sharded"  # one name for every process
    error: BaseException | None = None
    if is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except Exception as e:
            error = _as_write_error(e, run_dir, step, tmp, run_id)
    settle(error)
    sharded, _ = _sharded_state(model, optimizer, teacher_state)
    dcp.save(sharded, checkpoint_id=str(tmp / SHARDED_DIR))
    if os.environ.get(STALL_ENV) == str(step):
        time.sleep(3600)  # test hook (module docstring): killed here, half-written
    barrier()  # every shard written
    final = root / step_name(step)
    if is_main:
        try:
            _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
            _torch_save({"per_process": rng_states or [rng_state()]}, tmp / "rng.pt")
            _seal(tmp, step, state, run_id)
        except Exception as e:
            error = _as_write_error(e, run_dir, step, tmp, run_id)
        try:
            if error is None:
                final = _publish(run_dir, step, tmp, keep_last=keep_last, run_id=run_id)
        except Exception as e:
            error = e
    settle(error)
    return final


def _as_write_error(
    e: Exception, run_dir: str | Path, step: int, tmp: Path, run_id: str | None
) -> Exception:
    """:func:`_write_failed` as a value: the :class:`CheckpointWriteError` for a disk's
    failure, else ``e`` itself (a bug keeps its traceback)."""
    try:
        _write_failed(e, run_dir, step, tmp, run_id)
    except CheckpointWriteError as user:
        return user
    return e


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / SHARDED_DIR).is_dir()


def _failure(e: BaseException) -> str:
    """The first failing process's error in a DCP ``CheckpointException``, in one line."""
    failures = getattr(e, "failures", None) or {}
    for rank, (exc, _) in sorted(failures.items()):
        return f"process {rank}: {type(exc).__name__}: {str(exc)[:200]}"
    return str(e)[:200]


def load_sharded_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    teacher_state: dict[str, torch.Tensor] | None = None,
    process_index: int = 0,
) -> dict[str, Any]:
    """Restore a :func:`save_sharded_checkpoint` checkpoint on every process (collective when
    distributed); return ``state.json``. DCP reshards to this run's process count and layout: a
    sharded FSDP2 module on any number of processes, or a plain module on one. ``teacher_state``
    (the EMA tensors) is filled in place. RNG as in :func:`load_checkpoint`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    sharded, options = _sharded_state(model, optimizer, teacher_state)
    try:
        dcp.load(sharded, checkpoint_id=str(path / SHARDED_DIR))
    except CheckpointException as e:
        # A BaseException: re-raised as an Exception, so that resume's fallback to the
        # previous checkpoint sees an unreadable shard (raised on every process alike).
        raise RuntimeError(f"{path / SHARDED_DIR} cannot be read: {_failure(e)}") from None
    # Not strict: the frozen parameters (a LoRA base) are not in the checkpoint.
    result = set_state_dict(
        model,
        optimizer,
        model_state_dict=sharded["model"],
        optim_state_dict=sharded["optimizer"],
        options=dataclasses.replace(options, strict=False),
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in result.missing_keys if k in trainable]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{path}: checkpoint does not match the model "
            f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    if teacher_state:
        with torch.no_grad():
            for n, v in sharded["teacher"].items():
                if v is not teacher_state[n]:
                    teacher_state[n].copy_(v)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    per_process = rng.get("per_process", [rng])
    if process_index < len(per_process):
        _set_rng_state(per_process[process_index])
    return state


def load_model_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """Restore trainable weights saved by ``save_pretrained`` (adapter or full model)."""
    adapter = model_dir / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(adapter)))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"{adapter}: unexpected adapter keys {unexpected[:5]}")
        return
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors) in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"{model_dir}: checkpoint does not match the model "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    process_index: int = 0,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore model, optimizer, scheduler and RNG; return (state.json, teacher state).

    Process ``process_index`` takes its own saved RNG state; one the checkpoint lacks (resuming
    on more processes than saved it) keeps its current state. ``state.json`` is read first, so
    a garbled one fails before anything is restored."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    load_model_weights(model, path / "model")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    per_process = rng.get("per_process", [rng])
    if process_index < len(per_process):
        _set_rng_state(per_process[process_index])
    teacher = None
    if (path / "teacher.safetensors").exists():
        teacher = load_file(str(path / "teacher.safetensors"))
    return state, teacher
