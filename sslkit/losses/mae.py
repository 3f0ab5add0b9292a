"""MAE's reconstruction loss on the masked patches.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
https://arxiv.org/abs/2111.06377.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MAELoss(nn.Module):
    """Mean squared error between predicted and true pixels of the masked patches only.

    With ``norm_pix=True`` (the paper's better-performing target) each target patch is
    normalised by its own mean and variance first. The loss has no cross-sample terms, so
    DDP's gradient averaging makes P processes of batch N equal one process of batch P * N.

    Args:
        norm_pix: normalise each target patch (mean 0, variance 1, eps 1e-6 as in MAE's code).

    Shapes:
        pred: (N, M, P) the decoder's pixels for the M masked patches of each image, P =
            patch_size^2 x channels (as ``sslkit.models.patchify`` lays them out).
        target: (N, M, P) the true pixels of the same patches.
        returns: scalar, the mean over N x M x P.

    Examples:
        >>> import torch
        >>> from sslkit.losses import MAELoss
        >>> target = torch.randn(2, 12, 48)
        >>> MAELoss(norm_pix=False)(target, target).item()
        0.0
    """

    def __init__(self, norm_pix: bool = True) -> None:
        super().__init__()
        self.norm_pix = norm_pix

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE's code
            target = (target - mean) / torch.sqrt(var + 1e-6)
        return torch.mean((pred.float() - target.float()) ** 2)
