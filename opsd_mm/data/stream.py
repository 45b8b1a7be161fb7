"""Endless, resumable, rank-sharded iteration over training examples (used by the trainer)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from opsd_mm.types import Example


class ExampleStream:
    """Endless, resumable iteration over examples in seeded per-epoch order, sharded by rank.

    Each global batch takes ``batch_size * world_size`` consecutive positions of the epoch's
    permutation; rank r keeps its contiguous slice, so no example is duplicated or dropped
    within an epoch (the tail that does not fill a global batch is carried into the next
    epoch's order). ``state()``/``load_state()`` make resume exact.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not examples:
            raise ValueError("no training examples")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.consumed = 0  # global positions consumed so far
        self._epoch = -1
        self._order: list[int] = []

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.examples))
        if epoch != self._epoch:
            self._order = list(range(len(self.examples)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            self._epoch = epoch
        return self._order[offset]

    def next_batch(self) -> list[Example]:
        start = self.consumed + self.rank * self.batch_size
        batch = [self.examples[self._index(start + j)] for j in range(self.batch_size)]
        self.consumed += self.batch_size * self.world_size
        return batch

    def state(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])
