"""BYOL: Grill et al. 2020, "Bootstrap Your Own Latent", https://arxiv.org/abs/2006.07733."""

from __future__ import annotations

from typing import ClassVar, Optional

from torch import Tensor, nn

from sslkit.config import Config, Count
from sslkit.losses import NegativeCosineLoss
from sslkit.methods.base import METHODS
from sslkit.methods.momentum import PredictorConfig, PredictorMethod
from sslkit.models import mlp_head


class BYOLConfig(PredictorConfig):
    """Defaults: the paper (section 3.3, appendix B): projector and predictor 4096 -> 256 with
    BatchNorm, EMA momentum 0.996 -> 1 on a cosine, its asymmetric augmentations."""

    preset: ClassVar[str] = "byol"
    name: str = "byol"
    proj_hidden_dim: Count = 4096
    proj_output_dim: Count = 256


@METHODS.register("byol", config=BYOLConfig)
class BYOL(PredictorMethod):
    """The student's prediction of one view regresses the teacher's projection of the other:
    negative cosine similarity, symmetrised and averaged. Loss term: ``byol``."""

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        self.criterion = NegativeCosineLoss()

    def make_head(self) -> nn.Module:
        m = self.config
        return mlp_head(self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim, m.proj_layers,
                        m.proj_batch_norm)

    def pair_loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        return 0.5 * self.criterion(prediction, target)
