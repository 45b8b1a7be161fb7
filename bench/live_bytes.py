"""Peak bytes of live tensor storages on the CPU: the CPU analog of CUDA's
``torch.cuda.max_memory_allocated``, for comparing working sets without a GPU.

Why: a process's peak RSS (what ``bench/divergence.py`` reports from ``/usr/bin/time -v``) is
honest but coarse (allocator caching, the weight's transposed copy that CPU matmuls make). To
say how many [tokens x vocabulary] buffers a loss keeps alive at once, and so predict its GPU
peak, we count tensor storages: every op run under :class:`LiveBytes` has its outputs' storages
recorded until the last tensor on each is garbage-collected.

Storages allocated before the mode (inputs, weights) are not counted, views of them neither.
Not counted either: the scratch an op allocates and frees inside itself. Python-side only, so
tensors freed by C++ without a Python object (rare: autograd's internal buffers) are seen when
their Python wrappers die, which PyTorch ties to the C++ lifetime once a wrapper exists.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as m: ...`` then ``m.peak`` (bytes) and ``m.live`` (still held)."""

    def __init__(self) -> None:
        super().__init__()
        self.holders: dict[tuple[int, int], int] = {}  # storage -> live tensors on it
        self.live = 0
        self.peak = 0

    def _release(self, key: tuple[int, int]) -> None:
        self.holders[key] -= 1
        if self.holders[key] == 0:
            del self.holders[key]
            self.live -= key[1]

    def _track(self, t: torch.Tensor, input_keys: set[tuple[int, int]]) -> None:
        key = _storage_key(t)
        if key[1] == 0 or (key not in self.holders and key in input_keys):
            return  # empty, or a view of a storage from before the mode
        if key not in self.holders:
            self.holders[key] = 0
            self.live += key[1]
            self.peak = max(self.peak, self.live)
        self.holders[key] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        input_keys = {
            _storage_key(t) for t in tree_iter((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        out = func(*args, **kwargs)
        seen: set[int] = set()
        for t in tree_iter(out):
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                self._track(t, input_keys)
        return out
