"""Weights from the trainer to the generation server over a two-process group (gloo or NCCL).

Why a group: the file transport (``opsd_mm.rollout.shared.save_sync_weights``) writes every
weight to disk and the server reads it back, so each sync pays a serialisation, a copy through
the page cache (or a network filesystem) and a deserialisation. A process group sends the
tensors straight from the trainer's memory into the server's, one at a time, and the server
hands each to vLLM's in-place reload as it arrives, so neither side ever holds a second copy
of the model. NCCL moves them GPU to GPU; gloo over TCP works everywhere (CPU, a server on
another machine without a shared GPU fabric).

How, as vLLM's stateless process group does it: the trainer hosts a ``TCPStore`` (rank 0), the
server joins it (rank 1), and both build the backend object (``ProcessGroupGloo`` /
``ProcessGroupNCCL``) from it directly, never through ``init_process_group``. So the group
lives beside any default group the trainer has for DDP or FSDP, and both sides need only torch
(the trainer's environment has no vLLM; the two torch versions may differ, measured with
2.14 and 2.13 over gloo).

Who may join. The store listens on the configured host only (a socket bound to that address,
handed to the store; torch's own master would listen on every interface), and gloo's
connections are bound to the same address. A TCPStore has no authentication and lists its keys
to anyone connected, so joining proves something else: both members hold the group's secret, a
random per-group key the trainer hands the server over the token-authenticated HTTP channel.
Right after the group forms, each side sends a fresh nonce and answers the other's with an
HMAC-SHA256 under the secret (:func:`_authenticate`); a member that cannot is refused (the
group is shut down, nothing is sent) on either side. The store is then closed: the group's
rendezvous is over, so nothing listens for joiners for the rest of the run.

Protocol, per sync: rank 0 broadcasts the set's manifest (every weight's name, dtype, shape),
so the server checks the whole set before it loads anything; then for every weight a
fixed-size header (UTF-8 JSON: name, dtype, shape, equal to the manifest's entry) and the
tensor; a header ``{"end": true, "count": n}`` closes the sync, and ``{"abort": why}`` ends it
when the trainer's side fails half-way (so the server stops waiting). The receiver allocates
each tensor from its header, and checks it against the manifest, so a mismatch surfaces as a
named weight, never as a silent misalignment.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import queue
import secrets
import socket
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from opsd_mm.rollout.shared import Manifest, dtype_name

HEADER_BYTES = 1024
BACKENDS = ("gloo", "nccl")
SECRET_BYTES = 32
_NONCE_BYTES = 32
_PREFIX = "opsd-mm/weights"


class GroupAuthError(RuntimeError):
    """The other member of a weight group could not prove that it holds the group's secret."""


def new_secret() -> str:
    """A fresh group secret, hex (what the trainer sends the server in ``/init_weight_group``)."""
    return secrets.token_hex(SECRET_BYTES)


# ----------------------------------------------------------------------------- the group


class _ClosableStore(torch.distributed.Store):
    """A store that forwards to ``inner`` until :meth:`close`, then refuses.

    Why: a process group keeps its store for as long as it lives, and a TCPStore master keeps
    listening for as long as anything holds it. Handing the group this wrapper and dropping the
    wrapped store once the group has formed closes the listening socket while the group lives
    on."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self._inner = inner

    def close(self) -> None:
        self._inner = None

    def _store(self) -> Any:
        if self._inner is None:
            raise RuntimeError("the weight group's store is closed (the group has formed)")
        return self._inner

    def set(self, key, value):  # noqa: A003 (torch's Store interface)
        return self._store().set(key, value)

    def get(self, key):
        return self._store().get(key)

    def add(self, key, value):
        return self._store().add(key, value)

    def compare_set(self, key, expected, desired):
        return self._store().compare_set(key, expected, desired)

    def check(self, keys):
        return self._store().check(keys)

    def delete_key(self, key):
        return self._store().delete_key(key)

    def num_keys(self):
        return self._store().num_keys()

    def set_timeout(self, timeout):
        return self._store().set_timeout(timeout)

    def wait(self, keys, timeout=None):
        store = self._store()
        return store.wait(keys) if timeout is None else store.wait(keys, timeout)


def host_store(host: str, port: int, timeout_s: float) -> Any:
    """Rank 0's TCPStore, listening on ``host`` only, before the server is asked to join
    (``port`` 0: any free port; the chosen one is ``store.port``).

    torch's master binds every interface; here the listening socket is made and bound to
    ``host`` first and handed over (``master_listen_fd``), so the store is reachable at that
    address alone. ``host`` must be an address of this machine (``rollout.server_group_host``)."""
    import torch.distributed as dist

    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.create_server(address, family=family, backlog=16)
    bound = sock.getsockname()[1]
    return dist.TCPStore(
        host,
        bound,
        2,
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
        master_listen_fd=sock.detach(),  # the store owns (and closes) the socket
    )


def local_address_towards(host: str) -> str:
    """This machine's address on the route to ``host`` (a connected UDP socket sends nothing;
    the kernel picks the source address): where the server's end of a group listens."""
    family, _, _, _, address = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(address)
        return s.getsockname()[0]


def open_group(
    host: str,
    port: int,
    rank: int,
    backend: str,
    timeout_s: float,
    *,
    secret: str,
    store: Any = None,
) -> Any:
    """The backend object of an authenticated two-process group, its store closed.

    Rank 0 (the trainer) hosts the store on ``host:port`` (:func:`host_store`) unless it
    passes its own ``store``, which it must not keep: the store closes when this returns. Rank
    1 (the server) connects to it. Both block until the other has joined (at most
    ``timeout_s``), then prove to each other that they hold ``secret`` (hex, from
    :func:`new_secret`); a member that cannot is a :class:`GroupAuthError` on the other side.
    gloo's own connections are bound to ``host`` (rank 0) or to this machine's address towards
    it (rank 1)."""
    import torch.distributed as dist

    if backend not in BACKENDS:
        raise ValueError(f"weight group backend {backend!r}: expected one of {BACKENDS}")
    key = bytes.fromhex(secret)
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        if rank == 0:
            store = host_store(host, port, timeout_s)
        else:
            store = dist.TCPStore(host, port, 2, is_master=False, timeout=timeout)
    closable = _ClosableStore(store)
    del store  # the closable holds the only reference now: closing it closes the store
    prefixed = dist.PrefixStore(_PREFIX, closable)
    try:
        if backend == "gloo":
            options = dist.ProcessGroupGloo._Options()
            bind = host if rank == 0 else local_address_towards(host)
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=bind)]
            options._timeout = timeout
            group = dist.ProcessGroupGloo(prefixed, rank, 2, options)
            device = torch.device("cpu")
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            group = dist.ProcessGroupNCCL(prefixed, rank, 2, options)
            device = torch.device("cuda", torch.cuda.current_device())
        try:
            _authenticate(group, rank, key, device)
        except BaseException:
            close_group(group)
            raise
    finally:
        closable.close()
        del prefixed
        import gc

        gc.collect()  # the TCPStore (and its listening socket) goes now, not at some later GC
    return group


def _broadcast_bytes(group: Any, data: bytes | None, size: int, root: int, device) -> bytes:
    if data is None:
        t = torch.zeros(size, dtype=torch.uint8)
    else:
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    t = t.to(device)
    group.broadcast(t, root).wait()
    return bytes(t.cpu().tolist())


def _tag(key: bytes, who: bytes, nonce0: bytes, nonce1: bytes) -> bytes:
    return hmac.new(key, b"opsd-mm weight group " + who + nonce0 + nonce1, hashlib.sha256).digest()


def _authenticate(group: Any, rank: int, key: bytes, device: torch.device) -> None:
    """Each member proves it holds ``key`` with an HMAC over both members' fresh nonces (so a
    recorded answer cannot be replayed). Rank 0 checks rank 1's answer first and answers only
    a member that passed (zeros otherwise), so neither side learns anything it could reuse."""
    n0 = _broadcast_bytes(
        group, secrets.token_bytes(_NONCE_BYTES) if rank == 0 else None, _NONCE_BYTES, 0, device
    )
    mine = None
    if rank == 1:
        n1 = secrets.token_bytes(_NONCE_BYTES)
        mine = n1 + _tag(key, b"rank 1", n0, n1)
    got = _broadcast_bytes(group, mine, _NONCE_BYTES + 32, 1, device)
    n1, tag1 = got[:_NONCE_BYTES], got[_NONCE_BYTES:]
    if rank == 0:
        ok = hmac.compare_digest(tag1, _tag(key, b"rank 1", n0, n1))
        _broadcast_bytes(group, _tag(key, b"rank 0", n0, n1) if ok else bytes(32), 32, 0, device)
        if not ok:
            raise GroupAuthError(
                "the process that joined the weight group does not hold the group's secret "
                "(not the generation server this trainer asked to join); nothing was sent"
            )
    else:
        tag0 = _broadcast_bytes(group, None, 32, 0, device)
        if not hmac.compare_digest(tag0, _tag(key, b"rank 0", n0, n1)):
            raise GroupAuthError(
                "the weight group's rank 0 does not hold the group's secret (not the trainer "
                "that asked this server to join); nothing is received from it"
            )


def close_group(group: object) -> None:
    """Shut ``group`` down and let it go while the interpreter is still running. Why: a gloo
    group still alive at interpreter teardown can abort the process ("terminate called without
    an active exception": a joinable C++ thread destroyed), measured on 7 of 80 receiver exits
    under load; shut down and collected first, none of 160."""
    import gc

    group.shutdown()
    del group
    gc.collect()


# ----------------------------------------------------------------------------- the stream


def _header(payload: dict, device: torch.device) -> torch.Tensor:
    data = json.dumps(payload).encode()
    if len(data) > HEADER_BYTES:
        raise ValueError(f"weight header over {HEADER_BYTES} bytes: {payload['name'][:200]!r}")
    header_U = torch.full((HEADER_BYTES,), ord(" "), dtype=torch.uint8)
    header_U[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return header_U.to(device)


def abort_send(group: object, error: BaseException, device: torch.device) -> None:
    """Tell the receiver that this sync will not come (it would otherwise wait for it)."""
    reason = f"{type(error).__name__}: {error}"[:500]
    group.broadcast(_header({"abort": reason}, device), 0).wait()


def send_weights(
    group: object,
    manifest: Manifest,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    device: torch.device,
) -> int:
    """Broadcast ``manifest``, then every (name, tensor) from rank 0, each moved to ``device``
    (the group's: CPU for gloo, the trainer's GPU for NCCL) one at a time. A tensor that is not
    the manifest's next entry aborts the sync (the receiver is told). Returns the tensor bytes
    sent."""
    data = json.dumps([list(m) for m in manifest]).encode()
    group.broadcast(_header({"manifest": len(data)}, device), 0).wait()
    group.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device), 0).wait()
    total = count = 0
    source = iter(named_tensors)
    while True:
        try:
            item = next(source, None)
            if item is not None:
                name, tensor = item
                meta = [name, dtype_name(tensor.dtype), list(tensor.shape)]
                if count >= len(manifest) or meta != list(manifest[count]):
                    want = list(manifest[count]) if count < len(manifest) else "the end"
                    raise RuntimeError(f"weight {count} is {meta}, its manifest said {want}")
            elif count != len(manifest):
                raise RuntimeError(f"{count} weights sent, the manifest listed {len(manifest)}")
        except BaseException as e:  # tell the receiver, which would otherwise wait for more
            abort_send(group, e, device)
            raise
        if item is None:
            break
        t = tensor.detach().to(device).contiguous()
        meta = {"name": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
        group.broadcast(_header(meta, device), 0).wait()
        group.broadcast(t, 0).wait()
        total += t.numel() * t.element_size()
        count += 1
    group.broadcast(_header({"end": True, "count": count}, device), 0).wait()
    return total


def _receive_header(group: object, device: torch.device) -> dict:
    header_U = torch.empty(HEADER_BYTES, dtype=torch.uint8, device=device)
    group.broadcast(header_U, 0).wait()
    meta = json.loads(bytes(header_U.cpu().tolist()).decode())
    if "abort" in meta:
        raise RuntimeError(f"the trainer aborted the weight sync: {meta['abort']}")
    return meta


def receive_manifest(group: object, device: torch.device) -> Manifest:
    """Rank 1's first step of a sync: the set's manifest, before any tensor."""
    meta = _receive_header(group, device)
    if "manifest" not in meta:
        raise RuntimeError(f"weight sync: expected the manifest first, got {sorted(meta)}")
    data_U = torch.empty(int(meta["manifest"]), dtype=torch.uint8, device=device)
    group.broadcast(data_U, 0).wait()
    return [
        (str(n), str(d), [int(x) for x in s])
        for n, d, s in json.loads(bytes(data_U.cpu().tolist()))
    ]


def _receive(
    group: object, device: torch.device, manifest: Manifest
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rank 1's side of :func:`send_weights` after the manifest, tensor after tensor."""
    count = 0
    while True:
        meta = _receive_header(group, device)
        if meta.get("end"):
            if meta["count"] != count or count != len(manifest):
                raise RuntimeError(
                    f"weight sync: sender sent {meta['count']}, got {count}, manifest "
                    f"{len(manifest)}"
                )
            return
        entry = [meta["name"], meta["dtype"], list(meta["shape"])]
        if count >= len(manifest) or entry != list(manifest[count]):
            raise RuntimeError(f"weight sync: weight {count} is {entry}, not the manifest's")
        t = torch.empty(meta["shape"], dtype=getattr(torch, meta["dtype"]), device=device)
        group.broadcast(t, 0).wait()
        count += 1
        yield meta["name"], t


def receive_weights(
    group: object, device: torch.device, manifest: Manifest, ahead: int = 2
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rank 1's side of :func:`send_weights` after :func:`receive_manifest`: yields each
    (name, tensor) on ``device``.

    Why a thread: a consumer that loads each tensor (vLLM's reload) and a receive that waits
    on the wire take turns otherwise; a receiving thread keeps up to ``ahead`` tensors
    arrived beyond the one being loaded, so the two overlap at the cost of that many tensors'
    memory. Iterate to the end (the caller drains it on failure too): the thread stops at the
    end marker, an abort, or an error, which is raised here in order."""
    arrived: queue.Queue = queue.Queue(maxsize=max(1, ahead))
    done = object()

    def run() -> None:
        try:
            for item in _receive(group, device, manifest):
                arrived.put(item)
            arrived.put(done)
        except BaseException as e:  # raised in the consumer's thread, in order
            arrived.put(e)

    threading.Thread(target=run, daemon=True, name="opsd-weight-receive").start()
    while True:
        item = arrived.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
