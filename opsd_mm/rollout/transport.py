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

Protocol, per sync: for every weight, rank 0 broadcasts a fixed-size header (UTF-8 JSON: name,
dtype, shape) and then the tensor; a header ``{"end": true, "count": n}`` closes the sync, and
``{"abort": why}`` ends it when the trainer's side fails half-way (so the server stops waiting). The
receiver allocates each tensor from its header, so nothing about the model is agreed in advance
and a mismatch surfaces as a named weight in vLLM's loader, not as a silent misalignment.
"""

from __future__ import annotations

import datetime
import json
import queue
import threading
from collections.abc import Iterable, Iterator

import torch

HEADER_BYTES = 1024
BACKENDS = ("gloo", "nccl")
_PREFIX = "opsd-mm/weights"


def open_group(
    host: str, port: int, rank: int, backend: str, timeout_s: float, *, store=None
) -> object:
    """The backend object of a two-process group: rank 0 (the trainer) hosts the TCPStore on
    ``host:port`` unless it passes its own ``store``; rank 1 (the server) connects to it. Both
    sides block here until the other has joined (at most ``timeout_s``)."""
    import torch.distributed as dist

    if backend not in BACKENDS:
        raise ValueError(f"weight group backend {backend!r}: expected one of {BACKENDS}")
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(host, port, 2, is_master=rank == 0, timeout=timeout)
    prefixed = dist.PrefixStore(_PREFIX, store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, 2, timeout)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(prefixed, rank, 2, options)


def close_group(group: object) -> None:
    """Shut ``group`` down and let it go while the interpreter is still running. Why: a gloo
    group still alive at interpreter teardown can abort the process ("terminate called without
    an active exception": a joinable C++ thread destroyed), measured on 7 of 80 receiver exits
    under load; shut down and collected first, none of 160."""
    import gc

    group.shutdown()
    del group
    gc.collect()


def host_store(host: str, port: int, timeout_s: float) -> object:
    """Rank 0's TCPStore, listening before the server is asked to join (``port`` 0: any free
    port; the chosen one is ``store.port``)."""
    import torch.distributed as dist

    return dist.TCPStore(
        host,
        port,
        2,
        is_master=True,
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def _header(payload: dict, device: torch.device) -> torch.Tensor:
    data = json.dumps(payload).encode()
    if len(data) > HEADER_BYTES:
        raise ValueError(f"weight header over {HEADER_BYTES} bytes: {payload['name'][:200]!r}")
    header_U = torch.full((HEADER_BYTES,), ord(" "), dtype=torch.uint8)
    header_U[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return header_U.to(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def send_weights(
    group: object, named_tensors: Iterable[tuple[str, torch.Tensor]], device: torch.device
) -> int:
    """Broadcast every (name, tensor) from rank 0, each moved to ``device`` (the group's: CPU
    for gloo, the trainer's GPU for NCCL) one at a time. Returns the tensor bytes sent."""
    total = count = 0
    source = iter(named_tensors)
    while True:
        try:
            item = next(source, None)
        except BaseException as e:  # tell the receiver, which would otherwise wait for more
            reason = f"{type(e).__name__}: {e}"[:500]
            group.broadcast(_header({"abort": reason}, device), 0).wait()
            raise
        if item is None:
            break
        name, tensor = item
        t = tensor.detach().to(device).contiguous()
        meta = {"name": name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
        group.broadcast(_header(meta, device), 0).wait()
        group.broadcast(t, 0).wait()
        total += t.numel() * t.element_size()
        count += 1
    group.broadcast(_header({"end": True, "count": count}, device), 0).wait()
    return total


def _receive(group: object, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Rank 1's side of :func:`send_weights`, tensor after tensor."""
    count = 0
    while True:
        header_U = torch.empty(HEADER_BYTES, dtype=torch.uint8, device=device)
        group.broadcast(header_U, 0).wait()
        meta = json.loads(bytes(header_U.cpu().tolist()).decode())
        if "abort" in meta:
            raise RuntimeError(f"the trainer aborted the weight sync: {meta['abort']}")
        if meta.get("end"):
            if meta["count"] != count:
                raise RuntimeError(f"weight sync: sender sent {meta['count']}, got {count}")
            return
        dtype = getattr(torch, meta["dtype"])
        t = torch.empty(meta["shape"], dtype=dtype, device=device)
        group.broadcast(t, 0).wait()
        count += 1
        yield meta["name"], t


def receive_weights(
    group: object, device: torch.device, ahead: int = 2
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rank 1's side of :func:`send_weights`: yields each (name, tensor) on ``device``.

    Why a thread: a consumer that loads each tensor (vLLM's reload) and a receive that waits
    on the wire take turns otherwise; a receiving thread keeps up to ``ahead`` tensors
    arrived beyond the one being loaded, so the two overlap at the cost of that many tensors'
    memory. Iterate to the end (the caller drains it on failure too): the thread stops at the
    end marker, an abort, or an error, which is raised here in order."""
    arrived: queue.Queue = queue.Queue(maxsize=max(1, ahead))
    done = object()

    def run() -> None:
        try:
            for item in _receive(group, device):
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
