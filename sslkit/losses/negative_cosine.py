"""Negative cosine similarity, the loss of BYOL and SimSiam.

Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020, https://arxiv.org/abs/2006.07733.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class NegativeCosineLoss(nn.Module):
    """``-cos(x0, x1)`` averaged over the batch: BYOL's ``2 - 2 cos`` up to a constant and scale.

    lightly's ``NegativeCosineSimilarity`` (also importable under that name from
    ``sslkit.losses``), the same arguments and call. It has no cross-sample terms, so under DDP's gradient averaging a
    step with P processes of batch N equals one process with batch P * N without any gathering.

    Args:
        dim: the feature dimension.
        eps: guards the norms against zero.

    Shapes:
        x0, x1: (N, D) predictions of one view and targets of the other (the target side is
            usually detached or comes from a momentum encoder).
        returns: scalar, in [-1, 1].

    Examples:
        >>> import torch
        >>> from sslkit.losses import NegativeCosineLoss
        >>> p = torch.randn(8, 16)
        >>> round(NegativeCosineLoss()(p, 2 * p).item(), 4)
        -1.0
    """

    def __init__(self, dim: int = 1, eps: float = 1e-8) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        return -F.cosine_similarity(x0, x1, self.dim, self.eps).mean()


NegativeCosineSimilarity = NegativeCosineLoss  # lightly's name
