"""SimSiam: Chen and He 2021, "Exploring Simple Siamese Representation Learning",
https://arxiv.org/abs/2011.10566 (official code: facebookresearch/simsiam)."""

from __future__ import annotations

from typing import ClassVar, Optional

from torch import Tensor, nn

from sslkit.config import Config, Count
from sslkit.losses import NegativeCosineLoss
from sslkit.methods.base import METHODS, LossTerms
from sslkit.methods.two_view import ProjectionConfig, TwoViewMethod
from sslkit.models import mlp_head


class SimSiamConfig(ProjectionConfig):
    """Defaults: the paper's ImageNet setting: a 3-layer projector 2048 -> 2048 ending in
    BatchNorm (no affine, as the official code), a predictor 2048 -> 512 -> 2048, BYOL's
    augmentations."""

    preset: ClassVar[str] = "byol"  # the augment preset of a recipe that names none
    name: str = "simsiam"
    proj_hidden_dim: Count = 2048
    proj_output_dim: Count = 2048
    proj_layers: Count = 3
    pred_hidden_dim: Count = 512


@METHODS.register("simsiam", config=SimSiamConfig)
class SimSiam(TwoViewMethod):
    """Symmetrised negative cosine similarity between one view's prediction and the other
    view's projection with its gradient stopped; no momentum encoder. Loss term: ``simsiam``."""

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        m = self.config  # cfg.method, a SimSiamConfig
        self.prediction_head = mlp_head(m.proj_output_dim, m.pred_hidden_dim, m.proj_output_dim, 2, m.proj_batch_norm)
        self.criterion = NegativeCosineLoss()

    def make_head(self) -> nn.Module:
        m = self.config
        return mlp_head(self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim, m.proj_layers,
                        m.proj_batch_norm, last_batch_norm=True)

    def loss_terms(self, z0: Tensor, z1: Tensor) -> LossTerms:
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)  # (B, D) each
        return {"simsiam": 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))}
