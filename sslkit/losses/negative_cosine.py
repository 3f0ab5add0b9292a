"""Negative cosine similarity, the loss of BYOL and SimSiam.

Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020, https://arxiv.org/abs/2006.07733.
"""

from __future__ import annotations

from lightly.loss import NegativeCosineSimilarity


class NegativeCosineLoss(NegativeCosineSimilarity):
    """``-cos(x0, x1)`` averaged over the batch: BYOL's ``2 - 2 cos`` up to a constant and scale.

    lightly's implementation. It has no cross-sample terms, so under DDP's gradient averaging a
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
        super().__init__(dim=dim, eps=eps)
