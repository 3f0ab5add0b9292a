"""I-JEPA's loss: the distance between predicted and target patch representations.

Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture", CVPR 2023, https://arxiv.org/abs/2301.08243 (official code:
facebookresearch/ijepa, ``src/train.py``).
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.errors import ArgumentError

DISTANCES = ("smooth_l1", "l2")


class IJEPALoss(nn.Module):
    """The mean over target patches and features of ``smooth_l1(prediction - target)`` (the
    official code) or ``(prediction - target)^2`` (the paper's L2); the targets come from the
    EMA target encoder and carry no gradient.

    Args:
        distance: ``smooth_l1`` (official code, beta 1) or ``l2``.

    Shapes:
        predictions, targets: (N, T, D) representations of T target patches.
        valid: (N, T) bool or 0/1 marking real target patches (the others are padding), or None.
        returns: scalar, the mean over the valid patches and the D features.

    Examples:
        >>> import torch
        >>> from sslkit.losses import IJEPALoss
        >>> IJEPALoss()(torch.randn(4, 6, 8), torch.randn(4, 6, 8)).shape
        torch.Size([])
    """

    def __init__(self, distance: str = "smooth_l1") -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ArgumentError(f"IJEPALoss distance must be one of {list(DISTANCES)}, got {distance!r}")
        self.distance = distance

    def forward(self, predictions: Tensor, targets: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        targets = targets.detach()
        if self.distance == "l2":
            per_element = F.mse_loss(predictions, targets, reduction="none")
        else:
            per_element = F.smooth_l1_loss(predictions, targets, reduction="none")  # (N, T, D)
        if valid is None:
            return per_element.mean()
        valid = valid.to(per_element.dtype)
        return (per_element.mean(-1) * valid).sum() / valid.sum().clamp(min=1)
