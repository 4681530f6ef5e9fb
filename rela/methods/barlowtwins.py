"""Barlow Twins (Zbontar et al., 2021): push the views' cross-correlation toward identity."""

from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead

from rela.data.augment import BYOL_VIEW_1, BYOL_VIEW_2
from rela.methods.base import TwoViewMethod
from rela.registry import METHODS


@METHODS.register("barlowtwins", help="cross-correlation to the identity")
class BarlowTwins(TwoViewMethod):
    views = (BYOL_VIEW_1, BYOL_VIEW_2)

    def __init__(self, backbone, feature_dim, num_classes, hidden_dim: int = 2048, out_dim: int = 2048,
                 lambda_param: float = 0.005):
        super().__init__(backbone, feature_dim, num_classes,
                         BarlowTwinsProjectionHead(feature_dim, hidden_dim, out_dim),
                         BarlowTwinsLoss(lambda_param=lambda_param))
