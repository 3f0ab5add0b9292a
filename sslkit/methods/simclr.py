"""SimCLR: Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", https://arxiv.org/abs/2002.05709."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from sslkit.config import Config, Positive
from sslkit.losses import NTXentLoss
from sslkit.methods.base import METHODS, LossTerms
from sslkit.methods.two_view import ProjectionConfig, TwoViewMethod
from sslkit.models import SimCLRProjectionHead


class SimCLRConfig(ProjectionConfig):
    """Defaults: the paper's ImageNet setting and the official code's (``run.py``): a 2-layer
    projector 2048 -> 128 with BatchNorm, temperature 0.1 (the paper's best at batch 4096)."""

    name: str = "simclr"
    temperature: Positive = 0.1
    gather_distributed: bool = True  # negatives from every process, with their gradients


@METHODS.register("simclr", config=SimCLRConfig)
class SimCLR(TwoViewMethod):
    """Two views of each image, lightly's head (BatchNorm on the output too), NT-Xent with the
    negatives of the global batch. Loss term: ``ntxent``."""

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        self.criterion = NTXentLoss(self.config.temperature, gather_distributed=self.config.gather_distributed)

    def make_head(self) -> nn.Module:
        m = self.config
        return SimCLRProjectionHead(self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim,
                                    m.proj_layers, m.proj_batch_norm)

    def loss_terms(self, z0: Tensor, z1: Tensor) -> LossTerms:
        return {"ntxent": self.criterion(z0, z1)}
