"""One run per run directory: a run id, the check that a fresh run does not land in a used
directory, and ``--overwrite``, which moves the old contents aside (never deletes them).

Why: checkpoints are found and pruned by step number, and ``metrics.jsonl`` is appended to. A
fresh run in a directory that holds another run's checkpoints would see the old run's
higher-numbered checkpoints as its newest (its own get pruned, and ``--resume`` after a crash
loads the old weights) while metrics.jsonl mixes both runs. So a fresh run refuses such a
directory unless told to resume it or to overwrite it, and every checkpoint records the id of
the run that wrote it (``state.json`` ``run_id``); pruning only removes the current run's.

``run.json`` in the run directory holds the id of the run that owns it.

:func:`check_writable` runs before anything loads (``opsd-mm train`` calls it right after the
config, the trainer again when it claims the directory): a run that cannot write its checkpoints
should not find out after the model loaded and a step trained.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path

from opsd_mm.config import ConfigError
from opsd_mm.errors import UserError
from opsd_mm.train import checkpoint as ckpt

RUN_FILE = "run.json"


class RunDirInUseError(ConfigError):
    """A fresh run was pointed at a directory that holds another run."""


class RunDirError(UserError):
    """``run_dir`` cannot hold a run: it (or a directory above it) is a file, or it cannot be
    written."""


def check_writable(run_dir: str | Path) -> None:
    """Raise :class:`RunDirError` (one line naming ``run_dir`` and the culprit) unless the run
    can create ``run_dir`` and write into it (and into its ``checkpoints/`` when that exists).

    Probed by creating and removing a file in ``run_dir``, or in the nearest directory above it
    that exists (where ``mkdir`` would create it): that is what the run does, and it also
    catches a read-only filesystem, which permission bits do not show (nor do they bind root)."""
    run_dir = Path(run_dir)
    nearest = run_dir
    while not nearest.exists() and nearest.parent != nearest:
        nearest = nearest.parent
    targets = [nearest]
    checkpoints = ckpt.checkpoint_dir(run_dir)
    if checkpoints.exists():
        targets.append(checkpoints)
    for target in targets:
        if not target.is_dir():
            raise RunDirError(
                f"run_dir={run_dir}: {target} is a file, not a directory; choose another run_dir"
            )
        try:
            fd, probe = tempfile.mkstemp(prefix=".opsd-mm-write-check-", dir=target)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise RunDirError(
                f"run_dir={run_dir}: {target} is not writable ({e.strerror}); choose a writable "
                "run_dir, or make it writable"
            ) from None


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]


def read_run_id(run_dir: str | Path) -> str | None:
    path = Path(run_dir) / RUN_FILE
    try:
        return str(json.loads(path.read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_run_id(run_dir: str | Path, run_id: str) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps({"run_id": run_id}) + "\n")
    os.replace(tmp, run_dir / RUN_FILE)


def used_by_a_run(run_dir: str | Path) -> list[str]:
    """What in ``run_dir`` belongs to a run: checkpoints (complete or partial) and non-empty
    ``metrics.jsonl``. A config.yaml or ``data inspect`` output alone does not count."""
    run_dir = Path(run_dir)
    found = []
    root = ckpt.checkpoint_dir(run_dir)
    if root.is_dir() and any(root.iterdir()):
        found.append(f"checkpoints ({len(ckpt.list_checkpoints(run_dir))} complete)")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    return found


def check_fresh(run_dir: str | Path) -> None:
    """Raise :class:`RunDirInUseError` (one line, naming run_dir and the flags) when a fresh run
    would mix with what ``run_dir`` already holds."""
    found = used_by_a_run(run_dir)
    if found:
        raise RunDirInUseError(
            f"run_dir={run_dir} already holds another run ({', '.join(found)}): pass --resume "
            "(trainer.resume=true) to continue it, --overwrite (trainer.overwrite=true) to move "
            "it aside and start afresh, or choose another run_dir"
        )


def move_aside(run_dir: str | Path) -> Path | None:
    """``--overwrite``: rename the whole run directory to ``<run_dir>.replaced-<time>`` (a
    sibling, atomic on one filesystem) so nothing of the old run is lost or mixed in; returns
    the new place (None when there was nothing to move)."""
    run_dir = Path(run_dir)
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}")
    os.replace(run_dir, dest)
    return dest
