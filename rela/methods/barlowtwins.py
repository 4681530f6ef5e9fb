"""Barlow Twins (Zbontar et al., 2021): push the views' cross-correlation toward identity.

Under DDP the loss is computed on the global batch: lightly's ``gather_distributed`` averages
the ranks' cross-correlation matrices but standardises each rank's projections with its own
batch statistics, which is not the one-process loss; gathering the projections first is.
"""

from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead

from rela.data.augment import BYOL_VIEW_1, BYOL_VIEW_2
from rela.distributed import global_batch
from rela.methods.base import TwoViewMethod
from rela.registry import METHODS


class GlobalBarlowTwinsLoss(BarlowTwinsLoss):
    """lightly's Barlow Twins loss over the projections of all ranks (identical on every rank)."""

    def forward(self, z_a, z_b):
        return super().forward(global_batch(z_a), global_batch(z_b))


@METHODS.register("barlowtwins", help="cross-correlation to the identity")
class BarlowTwins(TwoViewMethod):
    views = (BYOL_VIEW_1, BYOL_VIEW_2)

    def __init__(self, backbone, feature_dim, num_classes, hidden_dim: int = 2048, out_dim: int = 2048,
                 lambda_param: float = 0.005, gather_distributed: bool = True):
        loss = GlobalBarlowTwinsLoss if gather_distributed else BarlowTwinsLoss
        super().__init__(backbone, feature_dim, num_classes,
                         BarlowTwinsProjectionHead(feature_dim, hidden_dim, out_dim),
                         loss(lambda_param=lambda_param))
