"""The method interface: what ReLA needs from a base learning algorithm.

A method owns the backbone and whatever it trains around it (heads,
momentum/teacher networks). It declares its own augmentations (``views``),
computes its own loss from those views, and updates its momentum networks in
``update_momentum``, which the trainer calls on every step, during the ReLA
phase too, so the teacher follows the student through the hand-over.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from rela.data.augment import ViewAugment


class MethodOutput(NamedTuple):
    loss: torch.Tensor
    features: torch.Tensor  # backbone features of the first view, for the online monitor


class Method(nn.Module):
    views: tuple[ViewAugment, ...] = ()

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> MethodOutput:
        raise NotImplementedError

    def update_momentum(self, step: int, max_steps: int) -> None:
        """Move momentum networks toward the online ones; methods without any do nothing."""
