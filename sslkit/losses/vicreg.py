"""VICReg: variance, invariance and covariance regularisation.

Bardes et al., "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
Learning", ICLR 2022, https://arxiv.org/abs/2105.04906.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.distributed import check_gather, gather
from sslkit.errors import ArgumentError
from sslkit.losses.arguments import check_pair, pick_name


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
        lambda_param: the invariance weight (25); lightly's name, the paper's lambda.
        mu_param: the variance weight (25); the paper's mu.
        nu_param: the covariance weight (1); the paper's nu.
        gather_distributed: variance and covariance over the global batch.
        eps: added to the variance under the square root.
        sim_weight, var_weight, cov_weight: sslkit's names of the three weights (what the method
            config calls them); give one name of each.

    Shapes:
        z_a, z_b: (N, ..., D) projections of the two views, as lightly: extra dimensions (VICRegL's
            local features) are averaged over in the variance and covariance terms.
        returns: scalar.

    Raises:
        ArgumentError (a ValueError): outputs of different shapes, a batch of one, or
            ``gather_distributed`` without ``torch.distributed``.

    Examples:
        >>> import torch
        >>> from sslkit.losses import VICRegLoss
        >>> VICRegLoss()(torch.randn(8, 16), torch.randn(8, 16)).shape
        torch.Size([])
    """

    def __init__(
        self,
        lambda_param: float = 25.0,
        mu_param: float = 25.0,
        nu_param: float = 1.0,
        gather_distributed: bool = False,
        eps: float = 1e-4,
        *,
        sim_weight: Optional[float] = None,
        var_weight: Optional[float] = None,
        cov_weight: Optional[float] = None,
    ) -> None:
        super().__init__()
        check_gather(gather_distributed, "VICRegLoss")
        self.sim_weight = pick_name("VICRegLoss", ("lambda_param", lambda_param, 25.0), ("sim_weight", sim_weight))
        self.var_weight = pick_name("VICRegLoss", ("mu_param", mu_param, 25.0), ("var_weight", var_weight))
        self.cov_weight = pick_name("VICRegLoss", ("nu_param", nu_param, 1.0), ("cov_weight", cov_weight))
        self.gather_distributed = gather_distributed
        self.eps = eps

    # lightly's names of the three weights
    lambda_param = property(lambda self: self.sim_weight)
    mu_param = property(lambda self: self.var_weight)
    nu_param = property(lambda self: self.cov_weight)

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        terms = self.terms(z_a, z_b)
        return terms["invariance"] + terms["variance"] + terms["covariance"]

    def terms(self, z_a: Tensor, z_b: Tensor) -> dict[str, Tensor]:
        """The loss's weighted terms, whose sum ``forward`` returns: ``invariance``
        (``sim_weight`` times the MSE of this process's pairs), ``variance`` (``var_weight``
        times the mean of the two views' std hinges) and ``covariance`` (``cov_weight`` times
        the two views' squared off-diagonal covariances over D); each a scalar. Shapes as
        ``forward``."""
        check_pair("VICRegLoss", z_a, z_b)
        invariance = F.mse_loss(z_a, z_b)
        if self.gather_distributed:
            z_a, z_b = gather(z_a), gather(z_b)  # (P * N, ..., D)
        if len(z_a) < 2:
            raise ArgumentError(f"VICRegLoss needs a batch of at least 2 for its variance and covariance terms, "
                            f"got {len(z_a)}: use a larger batch")
        variance = 0.5 * (_variance_loss(z_a, self.eps) + _variance_loss(z_b, self.eps))
        covariance = _covariance_loss(z_a) + _covariance_loss(z_b)
        return {
            "invariance": self.sim_weight * invariance,
            "variance": self.var_weight * variance,
            "covariance": self.cov_weight * covariance,
        }


def _variance_loss(z: Tensor, eps: float) -> Tensor:
    """The mean hinge ``relu(1 - std)`` of every feature's std over the batch: z (N, ..., D) -> scalar."""
    return F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean()


def _covariance_loss(z: Tensor) -> Tensor:
    """The squared off-diagonal covariances over the batch, summed and divided by D, averaged
    over any middle dimensions: z (N, ..., D) -> scalar."""
    z = z - z.mean(0)
    cov = torch.einsum("n...c,n...d->...cd", z, z) / (len(z) - 1)  # (..., D, D)
    off_diagonal = cov.pow(2).sum((-2, -1)) - torch.diagonal(cov, dim1=-2, dim2=-1).pow(2).sum(-1)  # (...)
    return (off_diagonal / z.shape[-1]).mean()
