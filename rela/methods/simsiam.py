"""SimSiam (Chen & He, 2021): predict the stop-gradient projection of the other view."""

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead

from rela.data.augment import SIMSIAM_VIEW
from rela.methods.base import Method, MethodOutput, negative_cosine_per_sample
from rela.registry import METHODS


@METHODS.register("simsiam", help="predictor + stop-gradient")
class SimSiam(Method):
    views = (SIMSIAM_VIEW, SIMSIAM_VIEW)

    def __init__(self, backbone, feature_dim, num_classes, hidden_dim: int = 1024, out_dim: int = 1024):
        super().__init__(backbone, feature_dim, num_classes)
        self.projection_head = SimSiamProjectionHead(feature_dim, hidden_dim, out_dim)
        self.prediction_head = SimSiamPredictionHead(out_dim, out_dim // 4, out_dim)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, views, labels) -> MethodOutput:
        h0, h1 = self.embed(views[0]), self.embed(views[1])
        z0, z1 = self.projection_head(h0), self.projection_head(h1)
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
        loss = 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
        return MethodOutput(loss, h0, per_sample=negative_cosine_per_sample(p0, z1.detach(), p1, z0.detach()))
