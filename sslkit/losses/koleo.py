"""The KoLeo regulariser (Kozachenko-Leonenko differential entropy estimator) as DINOv2 uses it.

Sablayrolles et al., "Spreading vectors for similarity search", ICLR 2019,
https://arxiv.org/abs/1806.03198; Oquab et al., "DINOv2: Learning Robust Visual Features without
Supervision", 2023, https://arxiv.org/abs/2304.07193 (``dinov2/loss/koleo_loss.py``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.distributed import check_gather, gather, rank


class KoLeoLoss(nn.Module):
    """``-mean_i log(||x_i - x_nn(i)|| + eps)`` over L2-normalised rows, where ``x_nn(i)`` is
    the row nearest to ``x_i`` by cosine similarity (itself excluded): pushes each embedding
    away from its nearest neighbour, so the batch spreads over the sphere.

    The same arguments and value as lightly's ``KoLeoLoss`` (and dinov2's); with
    ``gather_distributed=True`` the neighbours are searched among every process's rows
    (gathered with their gradients), so P processes of N rows compute what one process of
    P x N rows does. DINOv2 searches within each process's batch (the default).

    Args:
        p: the norm degree of the distance to the neighbour (2).
        eps: added to the norms when normalising and to the distance before the log (1e-8).
        gather_distributed: look for neighbours in the global batch.

    Shapes:
        x: (N, D) embeddings, N >= 2.
        returns: scalar.

    Examples:
        >>> import torch
        >>> from sslkit.losses import KoLeoLoss
        >>> KoLeoLoss()(torch.randn(8, 16)).shape
        torch.Size([])
    """

    def __init__(self, p: float = 2, eps: float = 1e-8, gather_distributed: bool = False) -> None:
        super().__init__()
        check_gather(gather_distributed, "KoLeoLoss")
        self.p = p
        self.eps = eps
        self.gather_distributed = gather_distributed
        self.pairwise_distance = nn.PairwiseDistance(p=p, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(x, p=2, dim=-1, eps=self.eps)  # (N, D)
        others = gather(x) if self.gather_distributed else x  # (P * N, D)
        offset = rank() * len(x) if others is not x else 0
        cos = x @ others.t()  # (N, P * N)
        cos[:, offset:offset + len(x)].fill_diagonal_(-2.0)  # a row is not its own neighbour
        nearest = others[cos.argmax(dim=1)]  # (N, D)
        return -(self.pairwise_distance(x, nearest) + self.eps).log().mean()
