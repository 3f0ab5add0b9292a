"""MoCo v3's contrastive loss: queries against the momentum encoder's keys.

Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision Transformers",
ICCV 2021, https://arxiv.org/abs/2104.02057.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.distributed import gather, rank


class MoCoV3Loss(nn.Module):
    """InfoNCE of each query against every key of the global batch, its own key positive:
    ``2 * temperature * cross_entropy(q @ k.T / temperature)``, as in MoCo v3's code.

    The keys come from the momentum encoder and carry no gradient, so gathering them
    (``sslkit.distributed.gather``, whose backward then never runs) is exact: each process's
    loss is the mean over its own queries, and DDP's averaging makes P processes of batch N
    equal one of batch P * N.

    Args:
        temperature: 1.0 for ResNet-50 and 0.2 for ViTs in MoCo v3's code (``--moco-t``).
        gather_distributed: use the keys of every process as negatives.

    Shapes:
        query: (N, D) the online branch's predictions of one view (normalised inside).
        key: (N, D) the momentum encoder's projections of the other view.
        returns: scalar.

    Examples:
        >>> import torch
        >>> from sslkit.losses import MoCoV3Loss
        >>> MoCoV3Loss()(torch.randn(8, 16), torch.randn(8, 16)).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.2, gather_distributed: bool = True) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        query = F.normalize(query.float(), dim=1)
        key = F.normalize(key.detach().float(), dim=1)
        offset = 0
        if self.gather_distributed:
            key, offset = gather(key), rank() * len(query)  # (P * N, D)
        logits = query @ key.T / self.temperature  # (N, P * N)
        labels = torch.arange(len(query), device=query.device) + offset
        return 2 * self.temperature * F.cross_entropy(logits, labels)
