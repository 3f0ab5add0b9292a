"""SwAV's swapped-prediction loss with Sinkhorn-Knopp codes.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
NeurIPS 2020, https://arxiv.org/abs/2006.09882 (official code: facebookresearch/swav).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.distributed import check_gather
from sslkit.errors import ArgumentError
from sslkit.losses.sinkhorn_knopp import sinkhorn_knopp_teacher


class SwAVLoss(nn.Module):
    """SwAV's loss: for each high-resolution crop, Sinkhorn codes of its prototype scores are
    the targets of every other crop's softmax (temperature ``temperature``) over the prototypes;
    the cross-entropies are averaged over the other crops, then over the high-resolution crops.

    The same call, defaults and value as lightly's ``SwaVLoss`` (``tests/test_methods_more.py``
    compares them, queue included), returned as a 0-d tensor (lightly's has shape (1,)). With
    ``sinkhorn_gather_distributed`` the Sinkhorn sums are all-reduced over processes (see
    ``sinkhorn_knopp_teacher``): P processes of N rows then step as one process of P * N rows.

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
        check_gather(sinkhorn_gather_distributed, "SwAVLoss")
        if temperature <= 0 or sinkhorn_epsilon <= 0:
            raise ArgumentError(f"SwAVLoss needs temperature > 0 and sinkhorn_epsilon > 0, got {temperature} and "
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
            raise ArgumentError(f"SwAVLoss needs a high-resolution crop and at least 2 crops, got "
                            f"{len(high_resolution_outputs)} and {crops}")
        loss = high_resolution_outputs[0].new_zeros(())
        for i, scores in enumerate(high_resolution_outputs):
            with torch.no_grad():
                scores = scores.detach()
                if queue_outputs is not None:
                    scores = torch.cat([scores, queue_outputs[i].detach()])  # (N + Q, K)
                codes = sinkhorn_knopp_teacher(scores, self.sinkhorn_epsilon, self.sinkhorn_iterations,
                                               gather_distributed=self.sinkhorn_gather_distributed)
                codes = codes[: len(high_resolution_outputs[i])]  # (N, K)
            others = [s for v, s in enumerate(high_resolution_outputs) if v != i] + list(low_resolution_outputs)
            loss = loss + sum(self.subloss(s, codes) for s in others) / (crops - 1)
        return loss / len(high_resolution_outputs)


SwaVLoss = SwAVLoss  # lightly's name
