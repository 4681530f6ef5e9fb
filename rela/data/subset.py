"""The dynamic data subset (spec step 3): ``ratio * N`` images per epoch, chosen by a subset rule.

A rule (names registered in :data:`rela.registry.SUBSETS`) answers one question per epoch: which
``size`` of the ``n`` training images, and with what loss weights? Its draw depends only on the
seed, the epoch and state every rank holds alike (the per-image loss record, the prototypes), so
every rank draws the same subset and a resumed run the same as an uninterrupted one.

- ``random``: a uniform draw without replacement (the paper's rule, the default).
- ``loss[:KEEP]``: InfoBatch-style (Qin et al., ICLR 2024). Every image whose last recorded loss is
  above the mean of its phase's records (or that has none yet) is "not yet learned"; those fill up to
  KEEP of the budget (default 0.5), drawn at random when there are more, and the rest is drawn from
  the learned ones. Each image's loss is weighted by ``ratio / p`` (p: its chance of being drawn
  this epoch), so the expected gradient equals a uniform draw's. The last 1/8 of the epochs draw
  uniformly (InfoBatch's annealing), and so does the first (nothing recorded yet).
- ``prototype-hard[:K]``: k-means with K clusters (default 100) of the prior's targets; each epoch
  draws images with probability proportional to their distance from their prototype (Sorscher et
  al., NeurIPS 2022: far from the prototype = hard). Needs a prior.
- ``prototype-cover[:K]``: the same clusters; each epoch takes an equal share of the budget from
  every cluster (all of a cluster smaller than its share), uniformly within it. Needs a prior.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn
from torch.utils.data import Sampler

from rela.errors import RelaError
from rela.io import save_torch
from rela.registry import SUBSETS

UNRECORDED = -1  # phase tag of an image whose loss was never recorded
ANNEAL = 0.875  # loss rule: from this share of the epochs on, draw uniformly (InfoBatch's delta)


class SubsetRule:
    """Which ``size`` of ``n`` images an epoch trains on: :meth:`draw` -> (indices, loss weights or None)."""

    needs_losses = False  # the trainer records every image's last per-sample loss for it
    needs_prototypes = False  # build sets ``prototypes`` from the prior's targets

    def draw(self, n: int, size: int, g: torch.Generator, epoch: int, epochs: int):
        raise NotImplementedError


class RandomRule(SubsetRule):
    def draw(self, n, size, g, epoch, epochs):
        return torch.randperm(n, generator=g)[:size], None


class LossRecord(nn.Module):
    """Every image's last per-sample loss and the phase it was recorded in (0: ReLA, 1: the method).

    Buffers of the training module: they live on its device (recording costs no host sync) and ride
    in its checkpoints, so a resumed run draws its next subsets from the same record."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("value", torch.zeros(n))
        self.register_buffer("phase", torch.full((n,), UNRECORDED, dtype=torch.int8))

    @torch.no_grad()
    def record(self, index: torch.Tensor, losses: torch.Tensor, phase: int) -> None:
        self.value[index] = losses.detach().to(self.value.dtype)
        self.phase[index] = phase


class LossRule(SubsetRule):
    needs_losses = True

    def __init__(self, keep: float = 0.5):
        self.keep = keep
        self.losses: LossRecord | None = None  # bound by the trainer

    def not_learned(self) -> torch.Tensor:
        """Images whose last loss is above the mean of the losses recorded in the same phase, or unrecorded."""
        value, phase = self.losses.value.detach().float().cpu(), self.losses.phase.cpu()  # one sync per epoch
        high = phase == UNRECORDED
        for p in phase.unique().tolist():
            if p != UNRECORDED:
                mine = phase == p
                high |= mine & (value > value[mine].mean())
        return high

    def draw(self, n, size, g, epoch, epochs):
        high = None if self.losses is None or size >= n else self.not_learned()
        if high is None or bool(high.all()) or epoch >= ANNEAL * epochs:
            return RandomRule().draw(n, size, g, epoch, epochs)
        hard, easy = high.nonzero().flatten(), (~high).nonzero().flatten()
        n_hard = min(len(hard), round(self.keep * size))
        n_easy = min(len(easy), size - n_hard)
        n_hard = size - n_easy  # when the learned ones are too few, the rest comes from the others
        picked = torch.cat([hard[torch.randperm(len(hard), generator=g)[:n_hard]],
                            easy[torch.randperm(len(easy), generator=g)[:n_easy]]])
        # weight ratio / p: the expected weighted loss of a drawn image equals the uniform draw's
        ratio = size / n
        weights = torch.cat([torch.full((n_hard,), ratio * len(hard) / max(n_hard, 1)),
                             torch.full((n_easy,), ratio * len(easy) / max(n_easy, 1))])
        order = torch.randperm(size, generator=g)
        return picked[order], weights[order]


class Prototypes:
    """k-means of the prior's targets: each image's cluster and its distance to the cluster's centre."""

    def __init__(self, assign: torch.Tensor, distance: torch.Tensor, k: int, flops: float = 0.0):
        self.assign, self.distance, self.k, self.flops = assign, distance, k, flops


class PrototypeRule(SubsetRule):
    needs_prototypes = True

    def __init__(self, k: int = 100, mode: str = "hard"):
        self.k, self.mode = k, mode
        self.prototypes: Prototypes | None = None  # set by rela.build from the targets

    def draw(self, n, size, g, epoch, epochs):
        p = self.prototypes
        if self.mode == "hard":
            weight = p.distance.double().clamp_min(1e-12)
            return torch.multinomial(weight, size, replacement=False, generator=g), None
        return _per_cluster(p.assign, p.k, size, g), None


def _per_cluster(assign: torch.Tensor, k: int, size: int, g: torch.Generator) -> torch.Tensor:
    """An equal share of ``size`` from each cluster, uniformly within it; a cluster smaller than its
    share gives all its images and the rest is shared among the larger ones (water-filling)."""
    sizes = torch.bincount(assign, minlength=k)
    quota, left = torch.zeros(k, dtype=torch.long), size
    for j, c in enumerate(torch.argsort(sizes, stable=True).tolist()):
        quota[c] = min(int(sizes[c]), left // (k - j))
        left -= int(quota[c])
    order = torch.randperm(len(assign), generator=g)  # one shuffle, then the first quota[c] of each cluster
    members = assign[order]
    rank_in_cluster = torch.zeros_like(order)
    for c in range(k):
        mine = members == c
        rank_in_cluster[mine] = torch.arange(int(mine.sum()))
    picked = order[rank_in_cluster < quota[members]]
    return picked[torch.randperm(len(picked), generator=g)]


# --- k-means of the targets, cached beside the bank --------------------------------------

def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 30) -> Prototypes:
    """Lloyd's k-means with k-means++ seeding, on the device of ``x``. Small and exact enough to write here:
    it runs once per bank, on N x m targets, and torch does the distances as one matmul per iteration."""
    x = x.float()
    n = len(x)
    if not 1 <= k <= n:
        raise RelaError(f"prototype rule: K must be between 1 and the {n} training images, got {k}")
    g = torch.Generator().manual_seed(seed)
    sq = (x * x).sum(1)
    centres = x[torch.randint(n, (1,), generator=g)]
    best = torch.full((n,), float("inf"))
    for _ in range(1, k):  # k-means++: the next centre with probability proportional to the squared distance
        best = torch.minimum(best, (sq - 2 * x @ centres[-1] + (centres[-1] ** 2).sum()).clamp_min(0).cpu())
        centres = torch.cat([centres, x[torch.multinomial(best + 1e-12, 1, generator=g)]])
    for _ in range(iters):
        dist = sq[:, None] - 2 * x @ centres.T + (centres * centres).sum(1)[None]
        assign = dist.argmin(1)
        counts = torch.bincount(assign, minlength=k).clamp_min(1).to(x.dtype)
        moved = torch.zeros_like(centres).index_add_(0, assign, x) / counts[:, None]
        empty = torch.bincount(assign, minlength=k) == 0
        centres = torch.where(empty[:, None], centres, moved)  # an empty cluster keeps its centre
    dist = sq[:, None] - 2 * x @ centres.T + (centres * centres).sum(1)[None]
    value, assign = dist.min(1)
    m = x.shape[1]
    flops = (iters + 1) * 2.0 * n * k * m + k * 2.0 * n * m  # the distance matmuls, seeding included
    return Prototypes(assign.cpu(), value.clamp_min(0).sqrt().cpu(), k, flops)


def cached_prototypes(targets: torch.Tensor, k: int, seed: int, cache_dir: str | Path, key: str) -> Prototypes:
    """k-means of ``targets`` (K clusters, ``seed``), cached under ``cache_dir`` by the bank's key, the
    targets' shape, K and the seed; a file that does not match its key is recomputed, never trusted."""
    ident = hashlib.sha256(f"{key}|{tuple(targets.shape)}|{k}|{seed}".encode()).hexdigest()
    path = Path(cache_dir) / f"prototypes-{ident[:24]}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                if blob.get("ident") == ident and len(blob["assign"]) == len(targets):
                    return Prototypes(blob["assign"], blob["distance"], k, float(blob["flops"]))
            except Exception:  # noqa: BLE001 - truncated or foreign file: recompute below
                pass
        p = kmeans(targets, k, seed)
        save_torch({"ident": ident, "assign": p.assign, "distance": p.distance, "flops": p.flops}, path)
        return p


# --- names -------------------------------------------------------------------------------

def _keep(arg: str) -> float:
    try:
        value = float(arg)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise ValueError("KEEP must be a number in [0, 1]")
    return value


def _clusters(arg: str) -> int:
    if not arg.isdigit() or int(arg) < 1:
        raise ValueError("K must be a whole number >= 1")
    return int(arg)


@SUBSETS.register("random", help="a uniform draw each epoch (the paper's rule)")
def _random() -> SubsetRule:
    return RandomRule()


@SUBSETS.register("loss", arg="KEEP", arg_optional=True, parse=_keep,
                  help="InfoBatch-style: images above their phase's mean loss fill up to KEEP of the budget "
                       "(default 0.5), losses reweighted to stay unbiased")
def _loss(keep: float | None) -> SubsetRule:
    return LossRule() if keep is None else LossRule(keep)


@SUBSETS.register("prototype-hard", arg="K", arg_optional=True, parse=_clusters,
                  help="k-means (K clusters, default 100) of the prior's targets; draws favour images far from "
                       "their prototype (needs a prior)")
def _prototype_hard(k: int | None) -> SubsetRule:
    return PrototypeRule(k or 100, "hard")


@SUBSETS.register("prototype-cover", arg="K", arg_optional=True, parse=_clusters,
                  help="the same clusters; an equal share of the budget from every cluster (needs a prior)")
def _prototype_cover(k: int | None) -> SubsetRule:
    return PrototypeRule(k or 100, "cover")


class DynamicSubsetSampler(Sampler[int]):
    """Draws ``round(ratio * n)`` distinct indices per epoch, in random order, by a :class:`SubsetRule`.

    The draw depends only on ``(seed, epoch)`` and the rule's state, so a resumed run sees the same
    subsets as an uninterrupted one and every rank of a distributed job draws the same subset; rank
    ``r`` of ``world_size`` then takes every world_size-th index, so each sample of the subset is
    visited exactly once per epoch overall. Lightning calls :meth:`set_epoch` at the start of every epoch.

    ``state_dict`` records how far into its epoch the sampler got, and the epoch's draw (a rule that
    reads the losses would draw differently after the steps taken since); after ``load_state_dict`` the
    next pass over that epoch yields only the indices not yet consumed, so a run resumed from a
    mid-epoch checkpoint sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, n: int, ratio: float = 1.0, seed: int = 0, rank: int = 0, world_size: int = 1,
                 rule: SubsetRule | None = None, epochs: int = 1):
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.n, self.ratio, self.seed = n, ratio, seed
        self.rank, self.world_size = rank, world_size
        self.rule, self.epochs = rule or RandomRule(), epochs
        self.epoch = 0
        self.subset_size = max(1, round(ratio * n))
        self.consumed = 0  # indices handed out so far in the current pass
        self._resume_at: tuple[int, int] | None = None  # (epoch, indices already consumed)
        self._drawn: tuple[int, torch.Tensor, torch.Tensor | None] | None = None  # (epoch, subset, weights)
        self.weights: torch.Tensor | None = None  # loss weight of every image of this epoch's draw (else 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def draw(self, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole epoch's subset (all ranks) and its loss weights (None: all 1)."""
        epoch = self.epoch if epoch is None else epoch
        if self._drawn is not None and self._drawn[0] == epoch:
            return self._drawn[1], self._drawn[2]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        # every rule is the uniform draw when the budget is all the data (a run on all data ignores the rule)
        rule = self.rule if self.subset_size < self.n else RandomRule()
        subset, weights = rule.draw(self.n, self.subset_size, g, epoch, self.epochs)
        self._drawn = (epoch, subset, weights)
        return subset, weights

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        subset, _ = self.draw(epoch)
        # Drop the tail that does not divide evenly, so all ranks take equal steps.
        per_rank = len(subset) // self.world_size
        return subset[self.rank: per_rank * self.world_size: self.world_size]

    def __iter__(self):
        subset, weights = self.draw()
        if weights is None:
            self.weights = None
        else:  # per image, so the step looks a batch's weights up by index
            self.weights = torch.ones(self.n)
            self.weights[subset] = weights.float()
        order = self.indices().tolist()
        start = self._resume_at[1] if self._resume_at and self._resume_at[0] == self.epoch else 0
        self._resume_at = None
        self.consumed = start
        for index in order[start:]:
            self.consumed += 1  # counted as handed out, so a checkpoint between batches knows the position
            yield index

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "size": self.subset_size}
        if self._drawn is not None and self._drawn[0] == self.epoch and self.rule.needs_losses:
            state["drawn"], state["drawn_weights"] = self._drawn[1], self._drawn[2]
        return state

    def load_state_dict(self, state: dict) -> None:
        if (state.get("seed"), state.get("size")) != (self.seed, self.subset_size):
            raise RelaError(f"the checkpoint was written with --seed {state.get('seed')} and a subset of "
                            f"{state.get('size')} images per epoch, not --seed {self.seed} and {self.subset_size}; "
                            "resume with the run's own settings (its config.yaml)")
        self._resume_at = (int(state["epoch"]), int(state["consumed"]))
        # Already the resumed epoch before Lightning's set_epoch: worker processes (stream mode) draw
        # indices as soon as the loader's iterator exists, which Lightning makes before setting the epoch.
        self.epoch = int(state["epoch"])
        if "drawn" in state:
            self._drawn = (self.epoch, state["drawn"], state.get("drawn_weights"))

    def __len__(self) -> int:
        return self.subset_size // self.world_size


def build_subset(spec: str) -> SubsetRule:
    """The subset rule ``spec`` names (see :data:`rela.registry.SUBSETS`)."""
    return SUBSETS.create(spec)
