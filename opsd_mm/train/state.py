"""A run's state across processes and restarts: the run directory's claim, the settings a
checkpoint records, and loading the newest checkpoint that loads.

- :func:`claim_run_dir`: one run per run_dir (``opsd_mm/train/run_dir.py``). A fresh run refuses
  a directory that holds another run's checkpoints or metrics, unless ``trainer.overwrite``
  (then it is renamed to ``<run_dir>.replaced-<time>``), and writes a new run id; a resumed
  run keeps the directory's id.
- :func:`recorded_settings` / :func:`apply_settings`: the trainer settings a checkpoint records;
  on resume the config wins, never silently (each changed setting is logged).
- :class:`CheckpointState`: what a checkpoint's ``state.json`` holds (the step, the data
  position, counters, settings, the batch generated ahead), written by ``to_dict`` and read back
  by ``from_dict``, which checks every field: resume never trusts the file.
- :func:`load_newest`: the newest checkpoint of this run that loads; one that does not (a
  truncated weight file, garbled JSON, a ``state.json`` that is not an object, lacks a field,
  holds one of the wrong type or a step other than its directory's) is skipped for the previous
  one, with a warning naming both, and renamed ``corrupt-step-*``; when none loads,
  :class:`ResumeError` names each and why (one line, exit 2 on the command line).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from opsd_mm.config import RunConfig
from opsd_mm.errors import UserError
from opsd_mm.rollout.prefetch import rollouts_from_state, rollouts_to_state
from opsd_mm.train import checkpoint as ckpt
from opsd_mm.train import run_dir as rundir
from opsd_mm.train.distributed import raise_together
from opsd_mm.types import Rollout

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
    error = None
    if acc.is_main_process:
        try:
            if not tc.resume and tc.overwrite:
                moved = rundir.move_aside(run_dir)
                if moved is not None:
                    log.warning("trainer.overwrite: moved the previous %s to %s", run_dir, moved)
            if run_id is None:
                run_id = rundir.new_run_id()
                rundir.write_run_id(run_dir, run_id)
        except Exception as e:  # the other processes stop too, none waits
            error = e
    raise_together(error, f"claiming the run directory {run_dir}")
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


def saved_settings(state: CheckpointState) -> dict[str, Any]:
    """The settings a checkpoint's ``state.json`` records (older ones recorded the global
    batch apart)."""
    settings = dict(state.settings)
    if state.global_batch_size is not None:
        settings.setdefault(GLOBAL_BATCH, state.global_batch_size)
    return settings


class StateError(ValueError):
    """A checkpoint's ``state.json`` that cannot be resumed from; the message says why."""


class ResumeError(UserError):
    """``trainer.resume`` found checkpoints of this run, and none of them can be resumed."""

    kind = "resume error"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _rollouts(raw: Any) -> list[list[Rollout]]:
    """The rollouts of a batch generated ahead, every field checked (a list per prompt of
    ``Rollout`` objects as :func:`~opsd_mm.rollout.prefetch.rollouts_to_state` writes them)."""
    why = "'ahead.rollouts' must be a list (per prompt) of lists of rollouts"
    if not isinstance(raw, list) or not all(isinstance(g, list) for g in raw):
        raise StateError(why)
    for g in raw:
        for r in g:
            ok = (
                isinstance(r, dict)
                and set(r) == {f.name for f in dataclasses.fields(Rollout)}
                and isinstance(r["completion_ids"], list)
                and all(_is_int(t) for t in r["completion_ids"])
                and isinstance(r["finish_reason"], str)
                and (r["logprobs"] is None or isinstance(r["logprobs"], list))
                and all(_is_number(x) for x in r["logprobs"] or [])
                and (r["weight_version"] is None or _is_int(r["weight_version"]))
            )
            if not ok:
                raise StateError(f"{why}; one is {json.dumps(r)[:80]}")
    return rollouts_from_state(raw)


@dataclass(frozen=True)
class CheckpointState:
    """What a checkpoint's ``state.json`` holds besides the tensors: where the run stands.

    Written by the trainer through :meth:`to_dict` and read back through :meth:`from_dict`,
    which checks every field, so a damaged file is a :class:`StateError` (and resume falls
    back to the previous checkpoint) rather than a wrong resume or a traceback later."""

    # Optimizer steps done; equal to the number in the checkpoint's directory name.
    step: int
    # The run that wrote it (None: a checkpoint written before run ids).
    run_id: str | None
    # The data position: global examples consumed (``ExampleStream.state``).
    consumed: int
    # The skip and bad-step counters (``opsd_mm.train.batches.Counters``).
    counters: dict[str, int | float] = field(default_factory=dict)
    # Bad steps in a row when it was written.
    bad_in_row: int = 0
    # The process count and global batch it ran with (None: not recorded).
    num_processes: int | None = None
    global_batch_size: int | None = None
    # The trainer settings it ran with (:func:`recorded_settings`).
    settings: dict[str, Any] = field(default_factory=dict)
    # rollout.async: the next step's batch, generated from weights this checkpoint does not
    # hold: (the step it trains, its rollouts); None without one.
    ahead: tuple[int, list[list[Rollout]]] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "step": self.step,
            "run_id": self.run_id,
            "data": {"consumed": self.consumed},
            "counters": self.counters,
            "bad_in_row": self.bad_in_row,
            "num_processes": self.num_processes,
            "global_batch_size": self.global_batch_size,
            "settings": self.settings,
        }
        if self.ahead is not None:
            out["ahead"] = {"step": self.ahead[0], "rollouts": rollouts_to_state(self.ahead[1])}
        return out

    @classmethod
    def from_dict(cls, raw: Any, *, dir_step: int | None = None) -> CheckpointState:
        """The state of a parsed ``state.json``, each field checked; ``dir_step``: the step in
        the checkpoint's directory name, which ``step`` must equal. Older checkpoints (without
        a run id, settings or ``bad_in_row``) read with those fields' defaults."""
        if not isinstance(raw, dict):
            raise StateError(f"holds {_a(raw)}, not an object")

        def get(key: str, ok: Callable[[Any], bool], what: str, default: Any = ...) -> Any:
            if key not in raw or (raw[key] is None and default is not ...):
                if default is ...:
                    raise StateError(f"'{key}' is missing")
                return default
            if not ok(raw[key]):
                raise StateError(f"'{key}' must be {what}, not {raw[key]!r:.60}")
            return raw[key]

        step = get("step", _is_int, "an integer")
        if step < 0 or (dir_step is not None and step != dir_step):
            where = f"the directory is step {dir_step}" if dir_step is not None else "negative"
            raise StateError(f"'step' is {step} but {where}")
        data = raw.get("data")
        if not (isinstance(data, dict) and _is_int(data.get("consumed")) and data["consumed"] >= 0):
            raise StateError(
                f"'data' must be an object with an integer 'consumed' >= 0 (the data "
                f"position), not {data!r:.60}"
            )
        counters = get("counters", lambda v: isinstance(v, dict), "an object", {})
        if any(not _is_number(x) for x in counters.values()):
            raise StateError(f"'counters' must map names to numbers, not {counters!r:.60}")
        old_bad = raw.get("nonfinite_in_row", 0)  # its name before bad_in_row
        bad_in_row = get("bad_in_row", lambda v: _is_int(v) and v >= 0, "an integer >= 0", old_bad)
        if not (_is_int(bad_in_row) and bad_in_row >= 0):
            raise StateError("'bad_in_row' must be an integer >= 0")
        positive = lambda v: _is_int(v) and v >= 1  # noqa: E731
        ahead = get("ahead", lambda v: isinstance(v, dict), "an object", None)
        if ahead is not None:
            if ahead.get("step") != step + 1 or not _is_int(ahead.get("step")):
                raise StateError(
                    f"'ahead.step' must be the next step, {step + 1}, not {ahead.get('step')!r:.20}"
                )
            ahead = (step + 1, _rollouts(ahead.get("rollouts")))
        return cls(
            step=step,
            run_id=get("run_id", lambda v: isinstance(v, str), "a string", None),
            consumed=data["consumed"],
            counters=dict(counters),
            bad_in_row=bad_in_row,
            num_processes=get("num_processes", positive, "an integer >= 1", None),
            global_batch_size=get("global_batch_size", positive, "an integer >= 1", None),
            settings=dict(get("settings", lambda v: isinstance(v, dict), "an object", {})),
            ahead=ahead,
        )

    @classmethod
    def read(cls, path: Path) -> CheckpointState:
        """The checked state of checkpoint directory ``path`` (``step-NNNNNN``); a
        :class:`StateError` saying what is wrong with its ``state.json``."""
        try:
            raw = json.loads((path / "state.json").read_bytes())
        except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
            raise StateError(f"state.json cannot be read: {e}") from None
        try:
            return cls.from_dict(raw, dir_step=int(path.name[len(ckpt.STEP_PREFIX) :]))
        except StateError as e:
            sep = " " if str(e).startswith("holds ") else ": "
            raise StateError(f"state.json{sep}{e}") from None


def _a(value: Any) -> str:
    names = {list: "a list", str: "a string", int: "a number", float: "a number"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


def _ours(run_dir: Path, run_id: str | None) -> list[Path]:
    """The run's complete checkpoints, oldest first (None: unreadable or older ids count)."""
    return [
        p for p in ckpt.list_checkpoints(run_dir) if ckpt.checkpoint_run_id(p) in (run_id, None)
    ]


def _nothing_resumable(run_dir: Path, failed: list[tuple[Path, str]]) -> ResumeError:
    return ResumeError(
        f"trainer.resume: no checkpoint in {ckpt.checkpoint_dir(run_dir)} can be resumed: "
        + "; ".join(f"{p.name}: {why}" for p, why in failed)
        + ". Fix or remove them, or start afresh with --overwrite (the run directory is "
        "moved aside, nothing is deleted)"
    )


def check_resumable(run_dir: str | Path) -> None:
    """Before the model loads: when every checkpoint of the run in ``run_dir`` has a
    ``state.json`` that does not check, the :class:`ResumeError` :func:`load_newest` would
    raise after loading the model (minutes, for a real one). Reads only the small
    ``state.json`` files; a run without checkpoints passes (it starts at step 0)."""
    run_dir = Path(run_dir)
    failed: list[tuple[Path, str]] = []
    for path in reversed(_ours(run_dir, rundir.read_run_id(run_dir))):
        try:
            CheckpointState.read(path)
            return
        except StateError as e:
            failed.append((path, " ".join(str(e).split())))
    if failed:
        raise _nothing_resumable(run_dir, failed)


def load_newest(
    run_dir: Path,
    run_id: str | None,
    load: Callable[[Path], tuple[Any, dict[str, torch.Tensor] | None]],
    accelerator: Any,
) -> tuple[Path, CheckpointState, dict[str, torch.Tensor] | None] | None:
    """(path, its checked state, teacher state) of the newest checkpoint of run ``run_id`` in
    ``run_dir`` whose ``state.json`` checks (:meth:`CheckpointState.read`, before anything is
    restored) and that ``load`` restores (falling back past the others, see the module
    docstring); None when the run has no checkpoint. Every process loads the same files."""
    ours = _ours(run_dir, run_id)
    if not ours:
        return None
    failed: list[tuple[Path, str]] = []
    for path in reversed(ours):
        try:
            state = CheckpointState.read(path)
            _, teacher_state = load(path)
            break
        except StateError as e:
            failed.append((path, " ".join(str(e).split())))
        except Exception as e:  # noqa: BLE001 - any unreadable file: try the previous one
            failed.append((path, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"))
    else:
        raise _nothing_resumable(run_dir, failed)
    if failed:
        log.warning(
            "checkpoint %s cannot be loaded (%s); resuming from the previous complete "
            "checkpoint %s instead%s",
            failed[0][0],
            failed[0][1],
            path,
            f" ({len(failed) - 1} more unloadable)" if len(failed) > 1 else "",
        )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for bad, _ in failed:
                ckpt.set_aside_corrupt(bad)
    return path, state, teacher_state
