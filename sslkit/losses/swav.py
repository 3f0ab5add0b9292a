"""SwAV's swapped-prediction loss with Sinkhorn-Knopp codes.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
NeurIPS 2020, https://arxiv.org/abs/2006.09882 (official code: facebookresearch/swav).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.distributed import all_reduce_sum, world_size
from sslkit.errors import UserError


@torch.no_grad()
def sinkhorn(scores: Tensor, iterations: int = 3, epsilon: float = 0.05, gather_distributed: bool = False) -> Tensor:
    """SwAV's codes: ``exp(scores / epsilon)`` made (approximately) doubly stochastic by
    ``iterations`` rounds of Sinkhorn-Knopp, each prototype getting an equal share of the samples.

    With ``gather_distributed`` the sums over samples (the total and each prototype's row sum)
    are all-reduced with ``sslkit.distributed.all_reduce_sum``, so that P processes of N rows
    get the codes one process would compute for their P * N rows (the official code's
    ``distributed_sinkhorn``; every process must hold the same number of rows). The same
    computation as lightly's ``sinkhorn``; no gradient.

    Shapes: scores (N, K) similarities to the K prototypes -> codes (N, K), each row summing to 1.
    """
    processes = world_size() if gather_distributed else 1
    q = torch.exp(scores.float() / epsilon).t()  # (K, N); float32: exp(1 / 0.05) overflows float16
    total = q.sum()
    if processes > 1:
        all_reduce_sum(total)
    q = q / total
    samples = q.shape[1] * processes
    for _ in range(iterations):
        rows = q.sum(dim=1, keepdim=True)  # (K, 1): each prototype's mass over all samples
        if processes > 1:
            all_reduce_sum(rows)
        # the official code also divides by K here, which the column step cancels
        q = q / rows
        q = q / q.sum(dim=0, keepdim=True) / samples  # each sample's column
    return (q * samples).t().to(scores.dtype)


class SwAVLoss(nn.Module):
    """SwAV's loss: for each high-resolution crop, Sinkhorn codes of its prototype scores are
    the targets of every other crop's softmax (temperature ``temperature``) over the prototypes;
    the cross-entropies are averaged over the other crops, then over the high-resolution crops.

    The same call, defaults and value as lightly's ``SwaVLoss`` (``tests/test_methods_more.py``
    compares them, queue included), returned as a 0-d tensor (lightly's has shape (1,)). With
    ``sinkhorn_gather_distributed`` the Sinkhorn sums are all-reduced over processes (see
    :func:`sinkhorn`): P processes of N rows then step as one process of P * N rows.

    Args:
        temperature: of the softmax over prototype scores (SwAV: 0.1).
        sinkhorn_iterations: Sinkhorn-Knopp rounds (SwAV: 3).
        sinkhorn_epsilon: the codes' sharpness (SwAV: 0.05).
        sinkhorn_gather_distributed: compute the codes over every process's rows.

    Shapes:
        high_resolution_outputs: V_h x (N, K) prototype scores of the global crops (cosines:
            normalised features against normalised prototypes).
        low_resolution_outputs: V_l x (N, K) scores of the local crops (may be empty).
        queue_outputs: optional V_h x (Q, K) scores of earlier batches' global crops, appended
            to each crop's scores for the codes only (SwAV's queue for small batches).
        returns: scalar.

    Examples:
        >>> import torch
        >>> from sslkit.losses import SwAVLoss
        >>> high = [torch.randn(8, 32), torch.randn(8, 32)]
        >>> low = [torch.randn(8, 32) for _ in range(4)]
        >>> SwAVLoss()(high, low).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05,
                 sinkhorn_gather_distributed: bool = False) -> None:
        super().__init__()
        if temperature <= 0 or sinkhorn_epsilon <= 0:
            raise UserError(f"SwAVLoss needs temperature > 0 and sinkhorn_epsilon > 0, got {temperature} and "
                            f"{sinkhorn_epsilon}: set positive values")
        self.temperature = temperature
        self.sinkhorn_iterations = sinkhorn_iterations
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_gather_distributed = sinkhorn_gather_distributed

    def subloss(self, scores: Tensor, codes: Tensor) -> Tensor:
        """Cross-entropy of the softmax of ``scores`` (N, K) against ``codes`` (N, K): scalar."""
        return -(codes * F.log_softmax(scores / self.temperature, dim=1)).sum(dim=1).mean()

    def forward(self, high_resolution_outputs: Sequence[Tensor], low_resolution_outputs: Sequence[Tensor] = (),
                queue_outputs: Optional[Sequence[Tensor]] = None) -> Tensor:
        crops = len(high_resolution_outputs) + len(low_resolution_outputs)
        if len(high_resolution_outputs) < 1 or crops < 2:
            raise UserError(f"SwAVLoss needs a high-resolution crop and at least 2 crops, got "
                            f"{len(high_resolution_outputs)} and {crops}")
        loss = high_resolution_outputs[0].new_zeros(())
        for i, scores in enumerate(high_resolution_outputs):
            with torch.no_grad():
                scores = scores.detach()
                if queue_outputs is not None:
                    scores = torch.cat([scores, queue_outputs[i].detach()])  # (N + Q, K)
                codes = sinkhorn(scores, self.sinkhorn_iterations, self.sinkhorn_epsilon,
                                 self.sinkhorn_gather_distributed)[: len(high_resolution_outputs[i])]  # (N, K)
            others = [s for v, s in enumerate(high_resolution_outputs) if v != i] + list(low_resolution_outputs)
            loss = loss + sum(self.subloss(s, codes) for s in others) / (crops - 1)
        return loss / len(high_resolution_outputs)
