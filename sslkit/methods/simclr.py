"""SimCLR: two views, a projection head, NT-Xent with gathered negatives."""

from __future__ import annotations

import torch

from typing import Optional

from sslkit.config import Config
from sslkit.losses import NTXentLoss
from sslkit.methods.base import METHODS, Method
from sslkit.models import SimCLRProjectionHead


@METHODS.register("simclr")
class SimCLR(Method):
    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        m = cfg.method
        self.projection_head = SimCLRProjectionHead(
            self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim, m.proj_layers, m.proj_batch_norm
        )
        self.criterion = NTXentLoss(m.temperature, m.gather_distributed)

    def ssl_step(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x0, x1 = views  # (B, 3, h, w) each
        # One pass over both views: half the kernel launches, and BatchNorm sees 2B samples.
        h = self.backbone(torch.cat([x0, x1]))  # (2B, F)
        z0, z1 = self.projection_head(h).chunk(2)  # (B, D) each
        return self.criterion(z0, z1), h[: len(x0)]
