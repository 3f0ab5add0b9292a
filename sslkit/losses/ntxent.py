"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020, https://arxiv.org/abs/2002.05709.
"""

from __future__ import annotations

from lightly.loss import NTXentLoss as _LightlyNTXentLoss


class NTXentLoss(_LightlyNTXentLoss):
    """NT-Xent over two batches of projections: each sample's positive is its other view,
    the negatives are all other 2N - 2 samples (2 * world_size * N - 2 with gathering).

    lightly's implementation, kept because it is right: with ``gather_distributed=True`` the
    projections of every process are all-gathered with a backward that sums the gradients of
    every process's loss, so that under DDP's gradient averaging a step with P processes of
    batch N equals one process with batch P * N (``tests/test_distributed.py`` checks it).

    Args:
        temperature: scale of the cosine similarities, 0.5 in lightly's CIFAR-10 benchmark,
            0.1 to 0.2 for ImageNet.
        gather_distributed: use the negatives of every process.

    Shapes:
        out0, out1: (N, D) projections of the first and second views (normalised inside).
        returns: scalar, the mean over the 2N anchors of this process.

    Examples:
        >>> import torch
        >>> from sslkit.losses import NTXentLoss
        >>> loss_fn = NTXentLoss(temperature=0.5)
        >>> z0, z1 = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss_fn(z0, z1).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False) -> None:
        super().__init__(temperature=temperature, gather_distributed=gather_distributed)
