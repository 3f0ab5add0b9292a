"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020, https://arxiv.org/abs/2002.05709.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.distributed import gather, rank
from sslkit.errors import UserError


class NTXentLoss(nn.Module):
    """NT-Xent over two batches of projections: each sample's positive is its other view,
    the negatives are all other 2N - 2 samples (2 * world_size * N - 2 with gathering).

    The same loss as lightly's ``NTXentLoss`` (``tests/test_losses.py`` compares them), computed
    without a host-device synchronisation: lightly removes each anchor's similarity with itself
    by boolean-mask indexing, whose output size the GPU must report back to the host every step,
    and builds its distributed mask on the CPU. Here one (2N, 2M) similarity matrix gets
    ``-inf`` on those entries instead, which removes them from the softmax alike.

    With ``gather_distributed=True`` the projections of every process are all-gathered with
    ``sslkit.distributed.gather``, whose backward sums the gradients of every process's loss,
    so that under DDP's gradient averaging a step with P processes of batch N equals one
    process with batch P * N (``tests/test_distributed.py`` checks it).

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
        super().__init__()
        if temperature <= 0:
            raise UserError(f"NTXentLoss needs temperature > 0, got {temperature}: set a positive temperature")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        n = out0.shape[0]
        z = F.normalize(torch.cat([out0, out1]), dim=1)  # (2N, D): this process's anchors
        candidates, first = z, 0  # first: the global index of our first sample
        if self.gather_distributed:
            # (M, D) per view, M = world_size * N, rank-major; (2M, D) together
            candidates, first = torch.cat([gather(z[:n]), gather(z[n:])]), rank() * n
        m = candidates.shape[0] // 2
        logits = z @ candidates.T / self.temperature  # (2N, 2M)
        own = torch.arange(n, device=z.device) + first  # (N,): our samples' global indices
        self_col = torch.cat([own, own + m])  # (2N,): each anchor's own column
        positive = torch.cat([own + m, own])  # (2N,): its other view's column
        logits = logits.scatter(1, self_col[:, None], float("-inf"))
        return F.cross_entropy(logits, positive)
