"""MoCo v2 (Chen et al., 2020): contrast queries with momentum-encoded keys and a memory bank.

Batch norm is not shuffled across GPUs (--sync-batchnorm, the default under DDP, synchronises
it instead); under DDP the keys of all ranks enter the memory bank in rank order (lightly's
``gather_distributed``), so every rank holds the same bank.
"""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead

from rela.data.augment import MOCO_VIEW
from rela.methods.base import Method, MethodOutput
from rela.registry import METHODS


@METHODS.register("mocov2", help="contrastive against a queue of momentum keys")
class MoCoV2(Method):
    views = (MOCO_VIEW, MOCO_VIEW)

    def __init__(self, backbone, feature_dim, num_classes, hidden_dim: int = 1024, out_dim: int = 128,
                 temperature: float = 0.2, memory_bank_size: int = 4096,
                 momentum: tuple[float, float] = (0.99, 1.0), gather_distributed: bool = True):
        super().__init__(backbone, feature_dim, num_classes)
        self.projection_head = MoCoProjectionHead(feature_dim, hidden_dim, out_dim)
        self.add_momentum_copies("backbone", "projection_head", momentum=momentum)
        self.criterion = NTXentLoss(temperature=temperature, memory_bank_size=(memory_bank_size, out_dim),
                                    gather_distributed=gather_distributed)

    def forward(self, views, labels) -> MethodOutput:
        query_view, key_view = views
        h = self.embed(query_view)
        with torch.no_grad():
            key = self.projection_head_momentum(self.embed_momentum(key_view))
        return MethodOutput(self.criterion(self.projection_head(h), key), h)
