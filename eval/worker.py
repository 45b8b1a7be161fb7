"""A child process that runs grading calls under a hard deadline.

Why a plain ``python -m`` subprocess rather than ``multiprocessing``: the ``spawn`` start method
re-imports the caller's ``__main__`` (breaking unguarded scripts), and ``fork`` is unsafe next to
torch's threads. Here the child imports nothing but this module and the functions it is sent.

Protocol over the child's stdin/stdout: length-prefixed pickles. The parent sends
``(fn, args)`` with ``fn`` a module-level function (pickled by reference); the child answers
``("ok", value)`` or ``("error", message)``. A call past its deadline kills the child; the next
call starts a fresh one. The child's own prints go to stderr so they cannot corrupt the channel.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import IO, Any

_HEADER = struct.Struct(">Q")


def _write(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            raise EOFError("grading worker closed its output")
        buf += chunk
    return buf


def _read(stream: IO[bytes]) -> Any:
    (size,) = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    return pickle.loads(_read_exact(stream, size))


def _serve() -> None:
    """Child side: warm the heavy imports, then answer requests until stdin closes."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr
    inp = sys.stdin.buffer
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        import latex2sympy2_extended  # noqa: F401
        import math_verify  # noqa: F401
    except ImportError:  # a job that needs them reports the error itself
        pass
    _write(out, ("ready", None))
    while True:
        try:
            fn, args = _read(inp)
        except EOFError:
            return
        try:
            reply = ("ok", fn(*args))
        except Exception as e:  # report, never die: the parent decides what failure means
            reply = ("error", f"{type(e).__name__}: {e}")
        _write(out, reply)


class Worker:
    """Parent side: one child process, restarted after a timeout or a crash."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "opsd_mm.eval.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # its own process group: close() kills what it started too
        )
        # Start-up (imports) never counts against a call's deadline.
        try:
            status, _ = _read(self._proc.stdout)
        except EOFError:
            status = "died"
        if status != "ready":
            self.close()
            raise RuntimeError(
                "the grading worker (python -m opsd_mm.eval.worker) failed to start; "
                "its error is on stderr"
            )

    def close(self) -> None:
        """Kill the child (if any) and every process it started (a grader that shells out,
        a library's own pool): the whole process group, so a call killed at its deadline
        leaves nothing running."""
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # already gone, with its group
                pass
            self._proc.wait()
            for s in (self._proc.stdin, self._proc.stdout):
                s.close()
        self._proc = None

    def call(self, fn: Callable[..., Any], args: tuple, timeout: float) -> tuple[str, Any]:
        """``("ok", value)``, ``("error", message)`` or ``("timeout", None)``."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self.close()
                self._start()
            assert self._proc is not None
            try:
                _write(self._proc.stdin, (fn, args))
                ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
                if ready:
                    return _read(self._proc.stdout)
            except (EOFError, OSError) as e:
                self.close()
                return ("error", f"grading worker died: {e}")
            self.close()
            return ("timeout", None)


if __name__ == "__main__":
    _serve()
