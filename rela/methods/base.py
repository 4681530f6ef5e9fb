"""The method interface: what ReLA needs from a base learning algorithm.

A method owns the backbone and whatever it trains around it (heads,
momentum/teacher networks). It declares its own augmentations (``views``),
computes its own loss from those views, and updates its momentum networks in
``update_momentum``, which the trainer calls on every step, during the ReLA
phase too, so the teacher follows the student through the hand-over.

**Under DDP** a method must train as one process on the global batch would. Losses that
are per-sample means (BYOL, SimSiam, DINO, supervised, the ReLA loss) get that from DDP's
gradient averaging, plus SyncBatchNorm for their batch-norm layers (``--sync-batchnorm``, on
by default with more than one device); DINO's teacher centre is all-reduced by lightly. Losses
over the whole batch gather it: SimCLR's and MoCo's negatives, Barlow Twins' cross-correlation,
VICReg's variance/covariance (``gather_distributed``, a method option, on by default). The
momentum (EMA) update is the same arithmetic on the same parameters on every rank.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from lightly.models.utils import deactivate_requires_grad
from torch import nn

from rela.data.augment import ViewAugment
from rela.schedules import momentum_schedule


class MethodOutput(NamedTuple):
    loss: torch.Tensor
    features: torch.Tensor  # backbone features of the first view, for the online monitor
    # the loss of each image (its mean is ``loss``), for methods whose loss is a per-sample mean: what
    # the subset rule ``loss`` records and reweights; None for losses over the whole batch (SimCLR, ...)
    per_sample: torch.Tensor | None = None


def negative_cosine_per_sample(p0: torch.Tensor, t1: torch.Tensor, p1: torch.Tensor, t0: torch.Tensor) -> torch.Tensor:
    """Each image's symmetric negative cosine loss (BYOL, SimSiam): the terms lightly's mean averages."""
    return -0.5 * (torch.nn.functional.cosine_similarity(p0, t1, dim=1)
                   + torch.nn.functional.cosine_similarity(p1, t0, dim=1))


class Method(nn.Module):
    views: tuple[ViewAugment, ...] = ()

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self._momentum_pairs: list[tuple[str, str]] = []
        self.momentum_range = (0.99, 1.0)
        self.momentum_schedule = momentum_schedule("cosine")  # rela.build sets the run's --momentum-schedule

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> MethodOutput:
        raise NotImplementedError

    def step_loss(self, views: list[torch.Tensor], labels: torch.Tensor, normalize: nn.Module) -> MethodOutput:
        """The method's part of a training step: its loss on augmented (not yet normalised) views of a batch."""
        return self([normalize(view) for view in views], labels)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).flatten(1)

    # --- momentum (EMA) networks, for the methods that have them -----------------------
    def add_momentum_copies(self, *names: str, momentum: tuple[float, float] = (0.99, 1.0),
                            **fresh: nn.Module) -> None:
        """Create ``<name>_momentum``: a frozen copy of ``<name>`` that follows it by EMA.

        Modules that cannot be deep-copied (weight-normed heads) are passed as
        ``name=freshly_built_module`` and receive the online weights.
        """
        for name in (*names, *fresh):
            if name in fresh:
                ema = fresh[name]
                ema.load_state_dict(getattr(self, name).state_dict())
            else:
                ema = copy.deepcopy(getattr(self, name))
            deactivate_requires_grad(ema)
            setattr(self, f"{name}_momentum", ema)
            self._momentum_pairs.append((name, f"{name}_momentum"))
        self.momentum_range = momentum

    def update_momentum(self, step: int, max_steps: int) -> float | None:
        """EMA update with the momentum schedule; returns the weight used (None: no momentum copies)."""
        if not self._momentum_pairs:
            return None
        m = self.momentum_schedule(step, max_steps, *self.momentum_range)
        # lightly's update_momentum, ema = m * ema + (1 - m) * online, as one foreach lerp over all the
        # parameters instead of three operators per parameter (measured: benchmarks/step_overhead.py)
        online = [p for name, _ in self._momentum_pairs for p in getattr(self, name).parameters()]
        ema = [p for _, name in self._momentum_pairs for p in getattr(self, name).parameters()]
        with torch.no_grad():
            torch._foreach_lerp_(ema, online, 1.0 - m)
        return m

    @torch.no_grad()
    def embed_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone_momentum(x).flatten(1)


class TwoViewMethod(Method):
    """Methods whose loss compares the projections of two views: SimCLR, Barlow Twins, VICReg."""

    def __init__(self, backbone, feature_dim, num_classes, projection_head: nn.Module, criterion: nn.Module):
        super().__init__(backbone, feature_dim, num_classes)
        self.projection_head = projection_head
        self.criterion = criterion

    def forward(self, views, labels) -> MethodOutput:
        h0, h1 = self.embed(views[0]), self.embed(views[1])
        return MethodOutput(self.criterion(self.projection_head(h0), self.projection_head(h1)), h0)
