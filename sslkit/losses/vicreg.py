"""VICReg: variance, invariance and covariance regularisation.

Bardes et al., "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
Learning", ICLR 2022, https://arxiv.org/abs/2105.04906.
"""

from __future__ import annotations

from lightly.loss import VICRegLoss as _LightlyVICRegLoss


class VICRegLoss(_LightlyVICRegLoss):
    """``sim_weight * MSE(z_a, z_b) + var_weight * hinge on each dimension's std +
    cov_weight * squared off-diagonal covariances``.

    lightly's implementation. With ``gather_distributed=True`` the variance and covariance
    terms use the embeddings of every process, gathered with a backward that sums every
    process's gradient, so that under DDP's averaging P processes of batch N equal one of
    batch P * N (``tests/test_methods_distributed.py``).

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
        super().__init__(lambda_param=sim_weight, mu_param=var_weight, nu_param=cov_weight,
                         gather_distributed=gather_distributed, eps=eps)
