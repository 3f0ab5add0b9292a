"""Barlow Twins: Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", https://arxiv.org/abs/2103.03230."""

from __future__ import annotations

from typing import ClassVar, Optional

from torch import Tensor

from sslkit.config import Config, Count, Positive
from sslkit.losses import BarlowTwinsLoss
from sslkit.methods.base import METHODS, LossTerms
from sslkit.methods.two_view import ProjectionConfig, TwoViewMethod


class BarlowTwinsConfig(ProjectionConfig):
    """Defaults: the paper and the official code (``main.py``): a 3-layer projector 8192-8192-8192
    with BatchNorm, lambda 0.0051, BYOL's augmentations."""

    preset: ClassVar[str] = "byol"
    name: str = "barlowtwins"
    proj_hidden_dim: Count = 8192
    proj_output_dim: Count = 8192
    proj_layers: Count = 3
    redundancy_weight: Positive = 0.0051  # the lambda of the off-diagonal terms
    gather_distributed: bool = True  # the cross-correlation over the global batch


@METHODS.register("barlowtwins", config=BarlowTwinsConfig)
class BarlowTwins(TwoViewMethod):
    """The cross-correlation of the two views' normalised projections driven to the identity.
    Loss terms: ``invariance`` (the diagonal) and ``redundancy`` (the weighted off-diagonal)."""

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        self.criterion = BarlowTwinsLoss(redundancy_weight=self.config.redundancy_weight,
                                         gather_distributed=self.config.gather_distributed)

    def loss_terms(self, z0: Tensor, z1: Tensor) -> LossTerms:
        return self.criterion.terms(z0, z1)
