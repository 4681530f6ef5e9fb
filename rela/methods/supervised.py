"""Supervised learning: cross-entropy with labels (ReLA's regression runs first, then this)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from rela.data.augment import SUPERVISED_VIEW
from rela.methods.base import Method, MethodOutput
from rela.registry import METHODS


@METHODS.register("supervised", help="cross-entropy after the ReLA phase")
class Supervised(Method):
    views = (SUPERVISED_VIEW,)

    def __init__(self, backbone, feature_dim, num_classes, label_smoothing: float = 0.0):
        super().__init__(backbone, feature_dim, num_classes)
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.label_smoothing = label_smoothing

    def forward(self, views, labels) -> MethodOutput:
        h = self.embed(views[0])
        each = F.cross_entropy(self.classifier(h), labels, label_smoothing=self.label_smoothing, reduction="none")
        return MethodOutput(each.mean(), h, per_sample=each)
