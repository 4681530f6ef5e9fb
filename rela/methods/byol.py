"""BYOL (Grill et al., 2020): predict the momentum network's projection of the other view."""

from __future__ import annotations

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

from rela.data.augment import BYOL_VIEW_1, BYOL_VIEW_2
from rela.methods.base import Method, MethodOutput, negative_cosine_per_sample
from rela.registry import METHODS


@METHODS.register("byol", help="predicts a momentum network's projection of the other view")
class BYOL(Method):
    views = (BYOL_VIEW_1, BYOL_VIEW_2)

    def __init__(self, backbone, feature_dim, num_classes, hidden_dim: int = 1024, out_dim: int = 256,
                 momentum: tuple[float, float] = (0.99, 1.0)):
        super().__init__(backbone, feature_dim, num_classes)
        self.projection_head = BYOLProjectionHead(feature_dim, hidden_dim, out_dim)
        self.prediction_head = BYOLPredictionHead(out_dim, hidden_dim, out_dim)
        self.add_momentum_copies("backbone", "projection_head", momentum=momentum)
        self.criterion = NegativeCosineSimilarity()

    @torch.no_grad()
    def _target(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.embed_momentum(x))

    def forward(self, views, labels) -> MethodOutput:
        x0, x1 = views
        h0, h1 = self.embed(x0), self.embed(x1)
        p0 = self.prediction_head(self.projection_head(h0))
        p1 = self.prediction_head(self.projection_head(h1))
        t1, t0 = self._target(x1), self._target(x0)
        loss = 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))
        return MethodOutput(loss, h0, per_sample=negative_cosine_per_sample(p0, t1, p1, t0))
