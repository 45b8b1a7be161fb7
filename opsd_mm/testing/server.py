"""An ``opsd-mm serve`` subprocess on loopback, for the generation-server tests and benches,
and the server's app on a thread, for the protocol tests with a fake engine.

Why here: the tests (``tests/vllm``) and ``bench/async_rollout.py`` start the same server the
same way; the bench also pins it to a CPU core (``prefix=["taskset", "-c", "1"]``).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict[str, str]:
    """One thread per process (the CPU tests share a small machine), a 1 GiB KV cache."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


class ServerProcess:
    """``python -m opsd_mm.cli serve MODEL`` (``python``: one with vLLM, by default this one)
    on 127.0.0.1:``port``, fp32, then ``extra_args``; ``start`` returns once it prints its
    ``serving`` line.

    Without a ``port`` the first start binds port 0 and reads the one the OS gave from that
    line (``url`` is set then), so no other process can take it between choosing and binding;
    a restart (``stop``, ``start``) binds the same port again."""

    def __init__(
        self,
        model: str | Path,
        port: int | None = None,
        *,
        max_model_len: int = 512,
        python: str = sys.executable,
        prefix: Sequence[str] = (),
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model, self.port = str(model), port or 0
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [
            *prefix,
            python,
            "-m",
            "opsd_mm.cli",
            "serve",
            self.model,
            "--dtype",
            "float32",
            "--max-model-len",
            str(max_model_len),
            *extra_args,
        ]
        self.proc: subprocess.Popen | None = None

    @property
    def cmd(self) -> list[str]:
        return [*self.args, "--port", str(self.port)]

    def start(self, timeout: float = 240.0) -> None:
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=server_env()
        )
        deadline = time.monotonic() + timeout
        lines = []
        for line in self.proc.stdout:
            lines.append(line)
            if line.startswith("serving "):
                break
            if time.monotonic() > deadline:
                break
        else:
            raise RuntimeError("server exited:\n" + "".join(lines[-30:]))
        found = re.search(r" on http://[^ ]+:(\d+) ", lines[-1])
        if not found:
            raise RuntimeError(f"no port in the server's line: {lines[-1]!r}")
        self.port = int(found.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        # Keep draining its output so that it never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class AppThread:
    """``opsd_mm.rollout.server``'s app for ``service`` under uvicorn, on a thread, on a free
    loopback port (``url``): the real HTTP stack around whatever engine the service holds.
    A context manager; ``stop`` returns once the server has shut down."""

    def __init__(self, service: object, token: str | None = None, limits: object = None) -> None:
        from opsd_mm.rollout.server import Limits, bind, build_app, uvicorn_server

        self.limits = limits or Limits()
        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn_server(build_app(service, token, self.limits), self.limits)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> AppThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the app thread did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def http_json(
    url: str,
    path: str,
    body: object = None,
    *,
    method: str = "POST",
    headers: dict | None = None,
    timeout: float = 120.0,
) -> tuple[int, dict]:
    """(status, JSON reply) of one request to ``url + path`` (``body``: JSON-encoded unless it
    is bytes); a reply that is not JSON comes back as ``{"text": ...}``."""
    import http.client
    import json
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    conn.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    try:
        return reply.status, json.loads(data or b"{}")
    except ValueError:
        return reply.status, {"text": data.decode(errors="replace")}


def raw_exchange(url: str, data: bytes, timeout: float = 120.0) -> tuple[int, bytes]:
    """Send ``data`` on a fresh connection to ``url``'s host and port, read until the server
    closes it: (the reply's status, the whole reply). ``timeout`` is a hang guard."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1]), reply


def listening_sockets(pid: int | str = "self", port: int | None = None) -> list[str]:
    """The local addresses (``ADDR:PORT`` in hex, as /proc/net/tcp writes them) of the TCP
    sockets process ``pid`` holds in the LISTEN state, on ``port`` only when given: which
    interface a server really listens on, read from the kernel."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            rows = f.read().splitlines()[1:]
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                if port is None or int(local.rsplit(":", 1)[1], 16) == port:
                    found.append(local)
    return found


LOOPBACK_V4 = "0100007F"  # 127.0.0.1 in /proc/net/tcp


def train_through_server(
    config: str | Path,
    url: str,
    run_dir: Path,
    overrides: Sequence[str],
    *,
    core: str | None = None,
    label: str = "run",
) -> list[dict]:
    """``opsd-mm train CONFIG rollout.engine=vllm_server`` against ``url`` in a fresh
    ``run_dir`` (removed first: the caller's own scratch directory), one thread, pinned to CPU
    ``core`` with ``taskset`` when given; returns its metrics rows. A failed run stops the
    caller (a bench) with ``label`` and the end of its stderr."""
    import shutil

    from opsd_mm.train.metrics import read_metrics

    cmd = [
        *(["taskset", "-c", core] if core is not None else []),
        *(sys.executable, "-m", "opsd_mm.cli", "train", str(config)),
        "rollout.engine=vllm_server",
        f"rollout.server_url={url}",
        *overrides,
        f"run_dir={run_dir}",
        "logging.progress=false",
    ]
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
    return read_metrics(Path(run_dir) / "metrics.jsonl")
