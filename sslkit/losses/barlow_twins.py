"""Barlow Twins: make the cross-correlation of two views' embeddings the identity.

Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021,
https://arxiv.org/abs/2103.03230.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from sslkit.distributed import check_gather, gather
from sslkit.errors import ArgumentError
from sslkit.losses.arguments import check_pair, pick_name


class BarlowTwinsLoss(nn.Module):
    """``sum_i (1 - C_ii)^2 + redundancy_weight * sum_{i != j} C_ij^2``, where C (D x D) is the
    cross-correlation of the two views' embeddings, each standardised over the batch.

    Written here rather than wrapped: lightly's ``BarlowTwinsLoss`` standardises each
    process's embeddings by that process's own batch statistics and then averages the
    per-process matrices, which is not the loss of the whole batch. The paper's code
    standardises with synchronised statistics. Here, with ``gather_distributed=True``, the
    embeddings of every process are gathered (with a backward that sums every process's
    gradient, ``sslkit.distributed.gather``) and the loss is that of the global batch, so P
    processes of batch N take the same step as one process of batch P * N
    (``tests/test_distributed.py``).

    ``terms`` gives the two weighted terms by name; ``forward`` returns their sum.

    Args:
        lambda_param: lambda, the weight of the off-diagonal terms (5e-3); lightly's name.
        gather_distributed: standardise and correlate over the global batch.
        redundancy_weight: sslkit's name for ``lambda_param`` (what the method config calls it);
            give one of the two.

    Shapes:
        z_a, z_b: (N, D) projections of the two views, N > 1.
        returns: scalar.

    Examples:
        >>> import torch
        >>> from sslkit.losses import BarlowTwinsLoss
        >>> z = torch.randn(64, 8)
        >>> BarlowTwinsLoss()(z, z).item() < BarlowTwinsLoss()(z, torch.randn(64, 8)).item()
        True
    """

    def __init__(
        self,
        lambda_param: float = 5e-3,
        gather_distributed: bool = False,
        *,
        redundancy_weight: Optional[float] = None,
    ) -> None:
        super().__init__()
        check_gather(gather_distributed, "BarlowTwinsLoss")
        self.redundancy_weight = pick_name("BarlowTwinsLoss", ("lambda_param", lambda_param, 5e-3),
                                           ("redundancy_weight", redundancy_weight))
        self.gather_distributed = gather_distributed

    @property
    def lambda_param(self) -> float:
        """lightly's name of ``redundancy_weight``."""
        return self.redundancy_weight

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        terms = self.terms(z_a, z_b)
        return terms["invariance"] + terms["redundancy"]

    def terms(self, z_a: Tensor, z_b: Tensor) -> dict[str, Tensor]:
        """The loss's weighted terms, whose sum ``forward`` returns: ``invariance`` (the
        on-diagonal ``sum_i (1 - C_ii)^2``) and ``redundancy`` (``redundancy_weight`` times the
        off-diagonal ``sum_{i != j} C_ij^2``); each a scalar. Shapes as ``forward``."""
        check_pair("BarlowTwinsLoss", z_a, z_b)
        if self.gather_distributed:
            z_a, z_b = gather(z_a), gather(z_b)  # (P * N, D)
        if len(z_a) < 2:
            raise ArgumentError(f"BarlowTwinsLoss needs a batch of at least 2 to standardise over, got {len(z_a)}: "
                            "use a larger batch")
        z_a, z_b = _standardize(z_a.float()), _standardize(z_b.float())
        c = z_a.T @ z_b / len(z_a)  # (D, D)
        diagonal = torch.diagonal(c)
        on_diagonal = (diagonal - 1).pow(2).sum()
        off_diagonal = c.pow(2).sum() - diagonal.pow(2).sum()
        return {"invariance": on_diagonal, "redundancy": self.redundancy_weight * off_diagonal}


def _standardize(z: Tensor) -> Tensor:
    """Mean 0 and variance 1 per dimension over the batch (biased variance, as BatchNorm)."""
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
