"""SimCLR (Chen et al., 2020): NT-Xent over the projections of two views.

Under DDP the negatives are the whole global batch (lightly's ``gather_distributed``, which
gathers with gradients and is a no-op in a single process).
"""

from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead

from rela.data.augment import SIMCLR_VIEW
from rela.methods.base import TwoViewMethod
from rela.registry import METHODS


@METHODS.register("simclr", help="contrastive, NT-Xent over the batch")
class SimCLR(TwoViewMethod):
    views = (SIMCLR_VIEW, SIMCLR_VIEW)

    def __init__(self, backbone, feature_dim, num_classes, hidden_dim: int = 1024, out_dim: int = 128,
                 temperature: float = 0.5, gather_distributed: bool = True):
        super().__init__(backbone, feature_dim, num_classes, SimCLRProjectionHead(feature_dim, hidden_dim, out_dim),
                         NTXentLoss(temperature=temperature, gather_distributed=gather_distributed))
