"""VICReg: Bardes, Ponce and LeCun 2022, "VICReg: Variance-Invariance-Covariance
Regularization for Self-Supervised Learning", https://arxiv.org/abs/2105.04906."""

from __future__ import annotations

from typing import ClassVar, Optional

from torch import Tensor

from sslkit.config import Config, Count, NonNegative
from sslkit.losses import VICRegLoss
from sslkit.methods.base import METHODS, LossTerms
from sslkit.methods.two_view import ProjectionConfig, TwoViewMethod


class VICRegConfig(ProjectionConfig):
    """Defaults: the paper and the official code (``main_vicreg.py``): a 3-layer expander
    8192-8192-8192 with BatchNorm, weights 25 / 25 / 1, BYOL's augmentations."""

    preset: ClassVar[str] = "byol"
    name: str = "vicreg"
    proj_hidden_dim: Count = 8192
    proj_output_dim: Count = 8192
    proj_layers: Count = 3
    sim_weight: NonNegative = 25.0
    var_weight: NonNegative = 25.0
    cov_weight: NonNegative = 1.0
    gather_distributed: bool = True  # variance and covariance over the global batch


@METHODS.register("vicreg", config=VICRegConfig)
class VICReg(TwoViewMethod):
    """Invariance between the views, variance and covariance of each view's embeddings.
    Loss terms: ``invariance``, ``variance``, ``covariance`` (weighted)."""

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        m = self.config
        self.criterion = VICRegLoss(sim_weight=m.sim_weight, var_weight=m.var_weight, cov_weight=m.cov_weight,
                                    gather_distributed=m.gather_distributed)

    def loss_terms(self, z0: Tensor, z1: Tensor) -> LossTerms:
        return self.criterion.terms(z0, z1)
