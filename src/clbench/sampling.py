"""Rank-aware samplers that make an N-process run see exactly the batches of a one-process run.

Lightning's default DistributedSampler gives rank r the items r, r+N, ... of its own permutation, so an N-process run
trains on different global batches than one process with an N-times larger batch. These samplers shuffle once with the
run's seed, cut the order into global batches of N × b, and give each rank its contiguous slice: with the per-example
mean loss of equal-length answers, 1 × (N·b) and N × b then take identical optimiser steps (up to float order).

The world size is read when iterating, not when the DataLoader is built, because Lightning's launcher starts the
other ranks only inside ``Trainer.fit`` / ``predict``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def world() -> tuple[int, int]:
    """(world size, global rank) of the initialised process group, else (1, 0)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class GlobalBatchSampler(Sampler[int]):
    """Training order: a seeded permutation cut into global batches; each rank yields its slice of each.

    Every rank yields the same number of items: a last global batch too small to split evenly is topped up from the
    start of the permutation (as DistributedSampler pads), so no rank waits for a missing step.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, shuffle: bool = True):
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        return torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed)).tolist()

    def __iter__(self) -> Iterator[int]:
        size, rank = world()
        order = self._order()
        if size == 1:
            return iter(order)
        per_rank = -(-len(order) // size)  # ceil: pad so that every rank has the same count
        order = order + order[: per_rank * size - len(order)]
        global_batch = self.batch_size * size
        mine: list[int] = []
        for start in range(0, len(order), global_batch):
            chunk = order[start : start + global_batch]
            share = len(chunk) // size
            mine.extend(chunk[rank * share : (rank + 1) * share])
        return iter(mine)

    def __len__(self) -> int:
        size, _ = world()
        return -(-self.num_items // size)


class ShardSampler(Sampler[int]):
    """Evaluation order: rank r takes items r, r+N, ... with no duplicates; predictions are gathered by index."""

    def __init__(self, num_items: int):
        self.num_items = num_items

    def __iter__(self) -> Iterator[int]:
        size, rank = world()
        return iter(range(rank, self.num_items, size))

    def __len__(self) -> int:
        size, rank = world()
        return len(range(rank, self.num_items, size))
