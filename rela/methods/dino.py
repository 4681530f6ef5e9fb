"""DINO (Caron et al., 2021): self-distillation from a momentum teacher, two global crops.

The teacher temperature is constant (no warm-up), so the loss does not depend on the epoch.
"""

from __future__ import annotations

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead

from rela.data.augment import DINO_VIEW_1, DINO_VIEW_2
from rela.methods.base import Method, MethodOutput
from rela.registry import METHODS


@METHODS.register("dino", help="self-distillation, 2 global crops")
class DINO(Method):
    views = (DINO_VIEW_1, DINO_VIEW_2)

    def __init__(self, backbone, feature_dim, num_classes, hidden_dim: int = 1024, bottleneck_dim: int = 128,
                 out_dim: int = 2048, teacher_temp: float = 0.04, momentum: tuple[float, float] = (0.996, 1.0)):
        super().__init__(backbone, feature_dim, num_classes)
        def head():
            return DINOProjectionHead(feature_dim, hidden_dim, bottleneck_dim, out_dim)

        self.projection_head = head()
        self.add_momentum_copies("backbone", momentum=momentum, projection_head=head())
        self.criterion = DINOLoss(output_dim=out_dim, warmup_teacher_temp=teacher_temp, teacher_temp=teacher_temp)

    def forward(self, views, labels) -> MethodOutput:
        hs = [self.embed(v) for v in views]
        student = [self.projection_head(h) for h in hs]
        with torch.no_grad():
            teacher = [self.projection_head_momentum(self.embed_momentum(v)) for v in views]
        return MethodOutput(self.criterion(teacher, student), hs[0])
