"""VICReg: variance, invariance and covariance regularisation.

Bardes et al., "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
Learning", ICLR 2022, https://arxiv.org/abs/2105.04906.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.loss.vicreg_loss import variance_loss
from torch import Tensor, nn

from sslkit.distributed import gather
from sslkit.errors import UserError


class VICRegLoss(nn.Module):
    """``sim_weight * MSE(z_a, z_b) + var_weight * hinge on each dimension's std +
    cov_weight * squared off-diagonal covariances``.

    lightly's terms and gathering; the covariance term is computed as the sum of all squared
    entries minus the diagonal's, where lightly indexes the D x D matrix with a boolean mask
    (at D = 8192, batch 4, one CPU thread: 1.6 s instead of 4.9 s forward and backward). With
    ``gather_distributed=True`` the variance and covariance terms use the embeddings of every
    process, gathered with a backward that sums every process's gradient
    (``sslkit.distributed.gather``), so that under DDP's averaging P processes of batch N equal
    one of batch P * N (``tests/test_distributed.py``).

    ``terms`` gives the three weighted terms by name; ``forward`` returns their sum.

    Args:
        sim_weight: the invariance weight, the paper's lambda (25).
        var_weight: the variance weight, mu (25).
        cov_weight: the covariance weight, nu (1).
        gather_distributed: variance and covariance over the global batch.
        eps: added to the variance under the square root.

    Shapes:
        z_a, z_b: (N, D) projections of the two views.
        returns: scalar.

    Examples:
        >>> import torch
        >>> from sslkit.losses import VICRegLoss
        >>> VICRegLoss()(torch.randn(8, 16), torch.randn(8, 16)).shape
        torch.Size([])
    """

    def __init__(
        self,
        sim_weight: float = 25.0,
        var_weight: float = 25.0,
        cov_weight: float = 1.0,
        gather_distributed: bool = False,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.sim_weight, self.var_weight, self.cov_weight = sim_weight, var_weight, cov_weight
        self.gather_distributed = gather_distributed
        self.eps = eps

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        terms = self.terms(z_a, z_b)
        return terms["invariance"] + terms["variance"] + terms["covariance"]

    def terms(self, z_a: Tensor, z_b: Tensor) -> dict[str, Tensor]:
        """The loss's weighted terms, whose sum ``forward`` returns: ``invariance``
        (``sim_weight`` times the MSE of this process's pairs), ``variance`` (``var_weight``
        times the mean of the two views' std hinges) and ``covariance`` (``cov_weight`` times
        the two views' squared off-diagonal covariances over D); each a scalar. Shapes as
        ``forward``."""
        invariance = F.mse_loss(z_a, z_b)
        if self.gather_distributed:
            z_a, z_b = gather(z_a), gather(z_b)  # (P * N, D)
        if len(z_a) < 2:
            raise UserError(f"VICRegLoss needs a batch of at least 2 for its variance and covariance terms, "
                            f"got {len(z_a)}: use a larger batch")
        variance = 0.5 * (variance_loss(z_a, self.eps) + variance_loss(z_b, self.eps))
        covariance = _covariance_loss(z_a) + _covariance_loss(z_b)
        return {
            "invariance": self.sim_weight * invariance,
            "variance": self.var_weight * variance,
            "covariance": self.cov_weight * covariance,
        }


def _covariance_loss(z: Tensor) -> Tensor:
    """Sum of the squared off-diagonal covariances over D: z (N, D) -> scalar."""
    z = z - z.mean(0)
    cov = z.T @ z / (len(z) - 1)  # (D, D)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / z.shape[1]
