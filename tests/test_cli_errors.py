"""User-facing failures of ``opsd-mm``: one or a few lines naming the key, file or line, exit 2;
``--debug`` / OPSD_MM_DEBUG=1 shows the traceback; Ctrl-C exits 130 without one."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opsd_mm import cli
from opsd_mm.config import ConfigError
from opsd_mm.data.load import DataError
from opsd_mm.errors import run_command, user_os_error
from opsd_mm.processors.images import BadImageError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_text.yaml")


def run_main(capsys, *argv: str) -> tuple[int, list[str]]:
    """Exit code and stderr lines, without datasets' progress bars and with no traceback."""
    rc = cli.main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, [x for x in err.strip().splitlines() if not x.startswith("Generating ")]


def test_batch_size_0_is_one_line_exit_2_before_any_model_loads(tmp_path):
    cache = tmp_path / "tiny-cache"  # a tiny model would be built here on first use
    proc = subprocess.run(
        [sys.executable, "-m", "opsd_mm.cli", "train", TINY, "trainer.batch_size=0",
         f"model.tiny_cache_dir={cache}", f"run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "config error: trainer.batch_size=0 is out of range: must be >= 1"
    ]
    assert not cache.exists() and not (tmp_path / "run").exists()


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n  lr: [1e-4\nloss:\n  beta: 0.5\n")
    rc, err = run_main(capsys, "train", str(bad))
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"config error: {bad}, line ") and "invalid YAML" in err[0]


def test_debug_flag_and_env_var_show_the_traceback(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [\n")
    for argv in (["--debug", "train", str(bad)], ["train", str(bad), "--debug"]):
        rc = cli.main(argv)
        err = capsys.readouterr().err
        assert (
            rc == 2
            and "Traceback" in err
            and err.strip().endswith(
                "invalid YAML: " + (err.strip().rsplit("invalid YAML: ", 1)[1])
            )
        )
    monkeypatch.setenv("OPSD_MM_DEBUG", "1")
    assert cli.main(["train", str(bad)]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("OPSD_MM_DEBUG", "0")
    assert cli.main(["train", str(bad)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_bad_jsonl_rows_name_the_file_and_line(tmp_path, capsys):
    good = b'{"problem": "1+1", "solution": "2"}\n'
    cases = {
        "latin1.jsonl": (good + b'{"problem": "caf\xe9", "solution": "x"}\n', "line 2: not UTF-8"),
        "torn.jsonl": (good * 2 + b'{"problem": "x", "solution": \n' + good, "line 3, column"),
        "list.jsonl": (good + b"[1, 2]\n", "line 2: a JSON Lines row must be an object"),
    }
    for name, (data, where) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        rc, err = run_main(
            capsys, "data", "inspect", TINY, f"data.source={path}", f"run_dir={tmp_path}/r"
        )
        assert rc == 2 and len(err) == 1, err
        assert err[0].startswith(f"data error: data.source: {path}, {where}"), err


def test_missing_local_model_path_is_not_a_hub_error(tmp_path, capsys):
    rc, err = run_main(
        capsys, "data", "inspect", TINY, f"model.name_or_path={tmp_path}/no/such/model",
        f"run_dir={tmp_path}/r",
    )  # fmt: skip
    assert rc == 2 and len(err) == 1
    assert "model.name_or_path" in err[0] and "neither a local directory" in err[0]
    assert "Repo id must be" not in err[0]


@pytest.mark.parametrize(
    "error, line",
    [
        (ConfigError("trainer.lr=0 is out of range"), "config error: trainer.lr=0 is out of range"),
        (DataError("data.source: x, line 3: bad"), "data error: data.source: x, line 3: bad"),
        (
            BadImageError("ex-7", "img/7.png", "truncated file"),
            "image error: example 'ex-7': bad image img/7.png: truncated file.",
        ),
        (FileNotFoundError("--adapter: no adapter_config.json in x"), "error: --adapter: no"),
        (
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "run/metrics.jsonl"),
            "error: [Errno 28] No space left on device: 'run/metrics.jsonl'",
        ),
        (
            OSError(errno.EROFS, os.strerror(errno.EROFS), "run"),
            "error: [Errno 30] Read-only file system: 'run'",
        ),
        (FileExistsError(errno.EEXIST, "File exists", "run"), "error: [Errno 17] File exists"),
    ],
)
def test_user_errors_are_short_messages_with_exit_2(error, line, capsys):
    def fail(_args):
        raise error

    assert run_command(fail, None) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and "Traceback" not in err


def test_ctrl_c_exits_130_without_a_traceback(capsys):
    def interrupted(_args):
        raise KeyboardInterrupt

    assert run_command(interrupted, None) == 130
    assert capsys.readouterr().err.strip() == "interrupted (Ctrl-C)"


def test_bugs_keep_their_traceback():
    def bug(_args):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_command(bug, None)

    def machine(_args):  # an I/O error of the device, or too many open files: not the user's
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with pytest.raises(OSError):
        run_command(machine, None)


def test_user_os_errors_found_behind_library_wrappers():
    """torch.save to a Python file re-raises a failed write as a RuntimeError whose context is
    the OSError; safetensors (Rust) names the errno in its message."""
    from safetensors import SafetensorError

    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None
    except RuntimeError as e:
        wrapped = e
    assert wrapped.__cause__ is None and user_os_error(wrapped).errno == errno.ENOSPC
    rust = SafetensorError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")
    assert user_os_error(rust).errno == errno.EDQUOT
    assert user_os_error(RuntimeError("a bug (os error 5)")) is None  # EIO: not the user's
    assert user_os_error(RuntimeError("a bug")) is None
