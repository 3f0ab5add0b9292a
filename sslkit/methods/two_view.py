"""Two-view embedding methods: one network on both views, a loss on the two projections.

SimCLR (NT-Xent with gathered negatives), Barlow Twins and VICReg differ only in their head
and loss.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from sslkit.config import Config, MethodConfig
from sslkit.losses import BarlowTwinsLoss, NTXentLoss, VICRegLoss
from sslkit.methods.base import METHODS, Method
from sslkit.models import SimCLRProjectionHead, mlp_head


class TwoViewMethod(Method):
    """``loss = criterion(head(backbone(x0)), head(backbone(x1)))``; subclasses choose the
    criterion (and may replace the head: an MLP of ``method.proj_*`` by default)."""

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        self.projection_head = self.make_head(cfg.method)
        self.criterion = self.make_criterion(cfg.method)

    def make_head(self, m: MethodConfig) -> nn.Module:
        return mlp_head(self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim, m.proj_layers,
                        m.proj_batch_norm)

    def make_criterion(self, m: MethodConfig) -> nn.Module:
        raise NotImplementedError

    def ssl_step(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x0, x1 = views  # (B, 3, h, w) each
        # One pass over both views: half the kernel launches, and BatchNorm sees 2B samples.
        h = self.backbone(torch.cat([x0, x1]))  # (2B, F)
        z0, z1 = self.projection_head(h).chunk(2)  # (B, D) each
        return self.criterion(z0, z1), h[: len(x0)]


@METHODS.register("simclr")
class SimCLR(TwoViewMethod):
    """Chen et al. 2020, https://arxiv.org/abs/2002.05709: lightly's head (BatchNorm on the
    output too), NT-Xent with gathered negatives."""

    def make_head(self, m: MethodConfig) -> nn.Module:
        return SimCLRProjectionHead(self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim,
                                    m.proj_layers, m.proj_batch_norm)

    def make_criterion(self, m: MethodConfig) -> nn.Module:
        return NTXentLoss(m.temperature, m.gather_distributed)


@METHODS.register("barlowtwins")
class BarlowTwins(TwoViewMethod):
    """Zbontar et al. 2021, https://arxiv.org/abs/2103.03230: a wide MLP (8192 x 3), the
    cross-correlation loss over the global batch."""

    def make_criterion(self, m: MethodConfig) -> nn.Module:
        return BarlowTwinsLoss(m.redundancy_weight, m.gather_distributed)


@METHODS.register("vicreg")
class VICReg(TwoViewMethod):
    """Bardes et al. 2022, https://arxiv.org/abs/2105.04906: a wide MLP (8192 x 3), variance,
    invariance and covariance terms, the statistics over the global batch."""

    def make_criterion(self, m: MethodConfig) -> nn.Module:
        return VICRegLoss(m.sim_weight, m.var_weight, m.cov_weight, m.gather_distributed)
