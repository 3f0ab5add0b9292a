"""Two-view embedding methods: one network on both views, a loss on the two projections
(SimCLR, Barlow Twins, VICReg differ only in their head, their loss and its terms)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from sslkit.config import Config, Count, MethodConfig
from sslkit.methods.base import LossTerms, Method
from sslkit.models import mlp_head


class ProjectionConfig(MethodConfig):
    """A projection head: an MLP of ``proj_layers`` linear layers (BatchNorm between them)."""

    proj_hidden_dim: Count = 2048
    proj_output_dim: Count = 128
    proj_layers: Count = 2
    proj_batch_norm: bool = True


class TwoViewMethod(Method):
    """``loss_terms(head(backbone(x0)), head(backbone(x1)))``; a subclass sets ``criterion``,
    names its terms and may replace the head (an MLP of ``method.proj_*`` by default)."""

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        self.projection_head = self.make_head()

    def make_head(self) -> nn.Module:
        m = self.config
        return mlp_head(self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim, m.proj_layers,
                        m.proj_batch_norm)

    def loss_terms(self, z0: Tensor, z1: Tensor) -> LossTerms:
        """z0, z1: (B, D) projections of the two views -> the loss terms by name."""
        raise NotImplementedError

    def ssl_step(self, views: list[Tensor]) -> tuple[LossTerms, Tensor]:
        x0, x1 = views  # (B, 3, h, w) each
        # One pass over both views: half the kernel launches, and BatchNorm sees 2B samples.
        h = self.backbone(torch.cat([x0, x1]))  # (2B, F)
        z0, z1 = self.projection_head(h).chunk(2)  # (B, D) each
        return self.loss_terms(z0, z1), h[: len(x0)]
