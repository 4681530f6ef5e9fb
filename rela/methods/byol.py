"""BYOL (Grill et al., 2020) from lightly's parts."""

from __future__ import annotations

import copy

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule

from rela.data.augment import BYOL_VIEW_1, BYOL_VIEW_2
from rela.methods.base import Method, MethodOutput


class BYOL(Method):
    views = (BYOL_VIEW_1, BYOL_VIEW_2)

    def __init__(self, backbone, feature_dim, num_classes, hidden_dim: int = 1024, out_dim: int = 256,
                 momentum: tuple[float, float] = (0.99, 1.0)):
        super().__init__(backbone, feature_dim, num_classes)
        self.projection_head = BYOLProjectionHead(feature_dim, hidden_dim, out_dim)
        self.prediction_head = BYOLPredictionHead(out_dim, hidden_dim, out_dim)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.momentum = momentum
        self.criterion = NegativeCosineSimilarity()

    def update_momentum(self, step: int, max_steps: int) -> None:
        m = cosine_schedule(step, max_steps, *self.momentum)
        update_momentum(self.backbone, self.backbone_momentum, m)
        update_momentum(self.projection_head, self.projection_head_momentum, m)

    def _target(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.projection_head_momentum(self.backbone_momentum(x).flatten(1))

    def forward(self, views, labels) -> MethodOutput:
        x0, x1 = views
        h0, h1 = self.backbone(x0).flatten(1), self.backbone(x1).flatten(1)
        p0 = self.prediction_head(self.projection_head(h0))
        p1 = self.prediction_head(self.projection_head(h1))
        loss = 0.5 * (self.criterion(p0, self._target(x1)) + self.criterion(p1, self._target(x0)))
        return MethodOutput(loss, h0)
