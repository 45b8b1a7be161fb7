"""A run directory the run cannot write is one line and exit 2: a full disk during a checkpoint
write (the partial checkpoint removed, the previous one intact, ``--resume`` continues), a
read-only ``run_dir`` and a ``run_dir`` that is a file (both refused before the model loads).

The full disk and the read-only directory are real where the machine lets an unprivileged
process mount a tmpfs in its own user and mount namespace (``unshare -Urm``); the in-process
full-disk test raises the error Python's own writes raise (``OSError`` ENOSPC) from
``torch.save``.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opsd_mm.cli import main
from opsd_mm.train import checkpoint as ckpt
from opsd_mm.train.metrics import read_metrics
from tests.fixtures.train_argv import tiny_train_argv

NO_MODEL = "model.name_or_path=/nonexistent/model"  # loading it would be a different error


_argv = tiny_train_argv


def _one_line(capsys) -> str:
    """The one error line, last on stderr (before it may come transformers' weight-loading
    progress bar; main() returned 2, so no traceback of ours)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [x for x in lines if x.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    return errors[0]


def _namespaces_work() -> bool:
    try:
        return subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


NAMESPACES = _namespaces_work()
needs_namespaces = pytest.mark.skipif(
    not NAMESPACES, reason="unshare -Urm (a user and mount namespace, for a tmpfs) not allowed"
)


def _in_tmpfs(mount: Path, options: str, script: str) -> subprocess.CompletedProcess:
    """``script`` (sh) with a tmpfs mounted at ``mount`` in a private mount namespace."""
    mount.mkdir(parents=True, exist_ok=True)
    setup = f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(mount))}"
    return subprocess.run(
        ["unshare", "-Urm", "sh", "-c", f"{setup} && {script}"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _cli(*argv: str) -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, "-m", "opsd_mm.cli", *argv])


def test_full_disk_during_a_checkpoint_write(
    tiny_cache, tiny_text_dir, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        name = Path(getattr(f, "name", f))
        if name.name == "optimizer.pt" and name.parent.name.startswith(".tmp-step-000002"):
            real_save(obj, f, *args, **kwargs)  # half written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(_argv(tiny_cache, run)) == 2
    line = _one_line(capsys)
    root = ckpt.checkpoint_dir(run)
    assert line.startswith(f"error: checkpoint {root / 'step-000002'} could not be written: ")
    assert "No space left on device" in line
    assert f"the last complete checkpoint {root / 'step-000001'} is intact" in line
    assert "--resume" in line
    assert not list(root.glob(".tmp-*"))  # the partial checkpoint is removed
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000001"]
    monkeypatch.setattr(torch, "save", real_save)
    assert main([*_argv(tiny_cache, run), "--resume"]) == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.slow
@needs_namespaces
def test_real_full_disk_then_resume_is_exact(tiny_cache, tiny_text_dir, tmp_path):
    """A 480 KiB tmpfs holds one checkpoint of the tiny run (about 300 KB) but not a second
    beside it: the second write fails, one line, exit 2; grown to 4 MiB, ``--resume`` ends
    with the losses of a run that never hit the wall."""
    want = tmp_path / "want"
    assert main(_argv(tiny_cache, want)) == 0
    mount = tmp_path / "disk"
    run = mount / "run"
    argv = _argv(tiny_cache, run, "trainer.keep_last=1")
    script = (
        f"{_cli(*argv)} 2> {shlex.quote(str(tmp_path / 'full.err'))}; echo rc=$? ; "
        f"ls -a {shlex.quote(str(run / 'checkpoints'))} ; "
        f"mount -o remount,size=4m {shlex.quote(str(mount))} && "
        f"{_cli(*argv, '--resume')} && cp {shlex.quote(str(run / 'metrics.jsonl'))} "
        f"{shlex.quote(str(tmp_path / 'metrics.jsonl'))}"
    )
    proc = _in_tmpfs(mount, "size=480k", script)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout.splitlines()
    assert "rc=2" in out, proc.stdout
    assert not any(x.startswith(".tmp-") for x in out)  # the partial checkpoint was removed
    err = [x for x in (tmp_path / "full.err").read_text().splitlines() if x.startswith("error")]
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert "Traceback" not in (tmp_path / "full.err").read_text()
    got = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3]
    # A resume repeats the computation: the same losses exactly.
    assert [r["loss"] for r in got] == [r["loss"] for r in read_metrics(want / "metrics.jsonl")]


@pytest.mark.parametrize("where", ["run_dir", "parent"])
@pytest.mark.parametrize("resume", [False, True])
def test_run_dir_that_is_a_file_before_the_model_loads(tmp_path, capsys, where, resume):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory\n")
    run = blocker if where == "run_dir" else blocker / "run"
    argv = [*_argv(tmp_path / "cache", run, NO_MODEL), *(["--resume"] if resume else [])]
    assert main(argv) == 2
    line = _one_line(capsys)
    assert line.startswith(f"error: run_dir={run}: ") and str(blocker) in line
    assert "is a file, not a directory" in line
    assert not (tmp_path / "cache").exists()  # nothing was built or loaded


# Run inside the namespace: one interpreter for every case (each start costs seconds).
_RO_CASES = """
import contextlib, io, json, sys
from opsd_mm.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    out.append([rc, err.getvalue().strip().splitlines()])
print(json.dumps(out))
"""


def test_read_only_run_dir_before_the_model_loads(tmp_path, capsys):
    """A read-only filesystem (a tmpfs mounted read-only in a namespace), or, without
    namespaces and as a user other than root, a directory without write permission; fresh and
    ``--resume``, the directory itself and one to be made below it."""
    if NAMESPACES:
        mount = tmp_path / "ro"
        cases = [
            (run, flag) for run in (mount, mount / "sub" / "run") for flag in ([], ["--resume"])
        ]
        argvs = [[*_argv(tmp_path / "c", run, NO_MODEL), *flag] for run, flag in cases]
        script = " ".join(
            shlex.quote(a) for a in [sys.executable, "-c", _RO_CASES, json.dumps(argvs)]
        )
        proc = _in_tmpfs(mount, "ro,size=64k", script)
        assert proc.returncode == 0, proc.stderr
        for (run, _), (rc, err) in zip(cases, json.loads(proc.stdout.splitlines()[-1])):
            assert rc == 2 and len(err) == 1, (run, rc, err)
            assert err[0].startswith(f"error: run_dir={run}: ") and "not writable" in err[0]
            assert "Read-only file system" in err[0]
        return
    if os.geteuid() == 0:
        pytest.skip("root ignores permissions, and namespaces are not allowed here")
    run = tmp_path / "locked"
    run.mkdir()
    run.chmod(0o555)
    try:
        for flag in ([], ["--resume"]):
            assert main([*_argv(tmp_path / "c", run, NO_MODEL), *flag]) == 2
            line = _one_line(capsys)
            assert line.startswith(f"error: run_dir={run}: ") and "not writable" in line
    finally:
        run.chmod(0o755)
