"""The dynamic data subset (spec step 3): a fresh random r*N indices each epoch."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class DynamicSubsetSampler(Sampler[int]):
    """Draws ``round(ratio * n)`` distinct indices per epoch, in random order.

    The draw depends only on ``(seed, epoch)``, so a resumed run sees the same
    subsets as an uninterrupted one and every rank of a distributed job draws the
    same subset; rank ``r`` of ``world_size`` then takes every world_size-th index,
    so each sample of the subset is visited exactly once per epoch overall.
    Lightning calls :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(self, n: int, ratio: float = 1.0, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.n, self.ratio, self.seed = n, ratio, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.subset_size = max(1, round(ratio * n))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + (self.epoch if epoch is None else epoch))
        subset = torch.randperm(self.n, generator=g)[: self.subset_size]
        # Drop the tail that does not divide evenly, so all ranks take equal steps.
        per_rank = len(subset) // self.world_size
        return subset[self.rank: per_rank * self.world_size: self.world_size]

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.subset_size // self.world_size
