"""Bytes held by tensors, counted from their storages: what the teacher-sharing tests and
``bench/memory_per_param.py`` measure.

Why storages and not ``numel``: two tensors that share memory (a tied head, a view, a module
shared between student and teacher) must count once, and a copy must count twice. A DTensor
(FSDP2) counts its local shard only: what this process holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a DTensor's local shard, else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Sum of the distinct storages' sizes behind ``tensors`` (each storage once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        s = local(t).untyped_storage()
        if s.nbytes():
            seen[(str(s.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj`` through modules (parameters and buffers), dicts,
    lists and the attributes of plain objects: what an object such as the teacher keeps
    alive."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(x: Any) -> None:
        if id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, torch.nn.Module):
            found.extend(x.parameters())
            found.extend(x.buffers())
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple, set)):
            for v in x:
                walk(v)
        elif hasattr(x, "__dict__") and not isinstance(x, type):
            for v in vars(x).values():
                walk(v)

    walk(obj)
    return found
