"""Data-parallel sharding of a map-style dataset's indices: rank r of world w gets a disjoint subset.

`shard_indices` is the index math (pure, testable without a process group); `ShardSampler` wraps
it for a DataLoader. Order for an epoch is a pure function of (seed, epoch), so a run resumes
exactly by re-creating the sampler and calling `set_epoch(epoch, skip=samples_already_seen)`.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def shard_indices(num_samples: int, rank: int, world_size: int, *, shuffle: bool = False,
                  seed: int = 0, epoch: int = 0, drop_last: bool = True) -> Sequence[int]:
    """Indices of `rank`'s shard for one epoch.

    1. Order the indices: 0..n-1, or a permutation seeded by (seed, epoch) when `shuffle`.
    2. drop_last: cut the order to a multiple of world_size, so every rank sees the same number
       of samples (and steps the same number of batches); otherwise ranks < n % world_size get
       one sample more and the shards together cover every index.
    3. Rank r takes positions r, r + w, r + 2w, ... of that order.

    Without shuffle this returns a `range` (O(1) memory, fit for huge synthetic datasets whose
    samples are already i.i.d.); with it, O(n) memory for the permutation.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"shard_indices: 'world_size' must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"shard_indices: 'rank' must be in 0..{world_size - 1}, got {rank!r}")
    if num_samples < 0:
        raise ValueError(f"shard_indices: 'num_samples' must be >= 0, got {num_samples}")
    end = num_samples - num_samples % world_size if drop_last else num_samples
    if not shuffle:
        return range(rank, end, world_size)
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    order_N = torch.randperm(num_samples, generator=gen)
    return order_N[rank:end:world_size].tolist()


class ShardSampler(Sampler[int]):
    """Yields this rank's indices (see `shard_indices`), skipping the first `skip` on resume."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, *,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = True):
        shard_indices(num_samples, rank, world_size, drop_last=drop_last)  # validates arguments
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order; `skip` = samples of this rank's shard already consumed."""
        if skip < 0:
            raise ValueError(f"ShardSampler.set_epoch: 'skip' must be >= 0, got {skip}")
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> Sequence[int]:
        return shard_indices(self.num_samples, self.rank, self.world_size, shuffle=self.shuffle,
                             seed=self.seed, epoch=self.epoch, drop_last=self.drop_last)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip:])

    def __len__(self) -> int:
        n, w = self.num_samples, self.world_size
        shard = n // w if self.drop_last else n // w + (1 if self.rank < n % w else 0)
        return max(shard - self.skip, 0)
