"""The dynamic data subset (spec step 3): a fresh random r*N indices each epoch."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from rela.errors import RelaError


class DynamicSubsetSampler(Sampler[int]):
    """Draws ``round(ratio * n)`` distinct indices per epoch, in random order.

    The draw depends only on ``(seed, epoch)``, so a resumed run sees the same
    subsets as an uninterrupted one and every rank of a distributed job draws the
    same subset; rank ``r`` of ``world_size`` then takes every world_size-th index,
    so each sample of the subset is visited exactly once per epoch overall.
    Lightning calls :meth:`set_epoch` at the start of every epoch.

    ``state_dict`` records how far into its epoch the sampler got; after
    ``load_state_dict`` the next pass over that epoch yields only the indices not
    yet consumed, so a run resumed from a mid-epoch checkpoint sees exactly the
    batches an uninterrupted run would.
    """

    def __init__(self, n: int, ratio: float = 1.0, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.n, self.ratio, self.seed = n, ratio, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.subset_size = max(1, round(ratio * n))
        self.consumed = 0  # indices handed out so far in the current pass
        self._resume_at: tuple[int, int] | None = None  # (epoch, indices already consumed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + (self.epoch if epoch is None else epoch))
        subset = torch.randperm(self.n, generator=g)[: self.subset_size]
        # Drop the tail that does not divide evenly, so all ranks take equal steps.
        per_rank = len(subset) // self.world_size
        return subset[self.rank: per_rank * self.world_size: self.world_size]

    def __iter__(self):
        order = self.indices().tolist()
        start = self._resume_at[1] if self._resume_at and self._resume_at[0] == self.epoch else 0
        self._resume_at = None
        self.consumed = start
        for index in order[start:]:
            self.consumed += 1  # counted as handed out, so a checkpoint between batches knows the position
            yield index

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "size": self.subset_size}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("seed"), state.get("size")) != (self.seed, self.subset_size):
            raise RelaError(f"the checkpoint was written with --seed {state.get('seed')} and a subset of "
                            f"{state.get('size')} images per epoch, not --seed {self.seed} and {self.subset_size}; "
                            "resume with the run's own settings (its config.yaml)")
        self._resume_at = (int(state["epoch"]), int(state["consumed"]))
        # Already the resumed epoch before Lightning's set_epoch: worker processes (stream mode) draw
        # indices as soon as the loader's iterator exists, which Lightning makes before setting the epoch.
        self.epoch = int(state["epoch"])

    def __len__(self) -> int:
        return self.subset_size // self.world_size
