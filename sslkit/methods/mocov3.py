"""MoCo v3: Chen, Xie and He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers", https://arxiv.org/abs/2104.02057."""

from __future__ import annotations

from typing import ClassVar, Optional

from torch import Tensor, nn

from sslkit.config import Config, Count, Positive, Probability
from sslkit.losses import MoCoV3Loss
from sslkit.methods.base import METHODS
from sslkit.methods.momentum import PredictorConfig, PredictorMethod
from sslkit.models import mlp_head


class MoCoV3Config(PredictorConfig):
    """Defaults: the paper: a 3-layer projector 4096 -> 256 ending in BatchNorm without affine, a
    2-layer predictor 4096 -> 256, temperature 0.2, EMA momentum 0.99 -> 1 on a cosine, BYOL's
    augmentations. (The official ResNet-50 script keeps ``--moco-t`` at its default 1.0.)"""

    preset: ClassVar[str] = "byol"
    name: str = "mocov3"
    proj_hidden_dim: Count = 4096
    proj_output_dim: Count = 256
    proj_layers: Count = 3
    temperature: Positive = 0.2
    momentum_base: Probability = 0.99
    gather_distributed: bool = True  # keys of the global batch as negatives


@METHODS.register("mocov3", config=MoCoV3Config)
class MoCoV3(PredictorMethod):
    """InfoNCE between the student's predictions and the teacher's keys of the global batch,
    symmetrised. Loss term: ``mocov3``."""

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        self.criterion = MoCoV3Loss(self.config.temperature, self.config.gather_distributed)

    def make_head(self) -> nn.Module:
        m = self.config
        return mlp_head(self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim, m.proj_layers,
                        m.proj_batch_norm, last_batch_norm=True)

    def pair_loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        return self.criterion(prediction, target)
