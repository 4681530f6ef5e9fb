"""VICReg (Bardes et al., 2022): invariance + variance + covariance terms on an expander.

The expander is the same 3-layer MLP as Barlow Twins', so lightly's head is reused. Under DDP the
variance and covariance terms see the global batch (lightly's ``gather_distributed``, with
gradients); the invariance term is a per-sample mean, which DDP's gradient averaging already makes global.
"""

from lightly.loss import VICRegLoss
from lightly.models.modules import BarlowTwinsProjectionHead

from rela.data.augment import BYOL_VIEW_1, BYOL_VIEW_2
from rela.methods.base import TwoViewMethod
from rela.registry import METHODS


@METHODS.register("vicreg", help="variance-invariance-covariance")
class VICReg(TwoViewMethod):
    views = (BYOL_VIEW_1, BYOL_VIEW_2)

    def __init__(self, backbone, feature_dim, num_classes, hidden_dim: int = 2048, out_dim: int = 2048,
                 gather_distributed: bool = True):
        super().__init__(backbone, feature_dim, num_classes, BarlowTwinsProjectionHead(feature_dim, hidden_dim, out_dim),
                         VICRegLoss(gather_distributed=gather_distributed))
