"""Sinkhorn-Knopp centring of a teacher's outputs, as DINOv2 uses it instead of DINO's centre.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"
(SwAV), NeurIPS 2020, https://arxiv.org/abs/2006.09882; Oquab et al., "DINOv2", 2023,
https://arxiv.org/abs/2304.07193 (``dinov2/loss/dino_clstoken_loss.py`` and
``ibot_patch_loss.py``, ``sinkhorn_knopp_teacher``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sslkit.distributed import all_reduce_sum


@torch.no_grad()
def sinkhorn_knopp_teacher(
    teacher_out: Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    valid: Optional[Tensor] = None,
    gather_distributed: bool = True,
) -> Tensor:
    """Soft assignments of the teacher's rows to its K prototypes with equal total mass per
    prototype: ``Q = exp(teacher_out / teacher_temp)``, then ``n_iterations`` of alternately
    scaling every prototype's mass to 1/K and every row's to 1/B over the global batch (the
    sums are all-reduced over processes), each row finally summing to 1.

    DINOv2's teacher centring and SwAV's codes (``SwAVLoss``: ``teacher_temp`` is its epsilon) are
    this one computation. With ``gather_distributed`` (dinov2's and SwAV's official code) the
    sums are over every process's rows, so P processes of B rows get what one process of P * B
    rows gets (every process must hold the same number of rows); without, over this process's.

    ``valid`` marks the rows that take part (the others, padding, get all-zero rows and no
    mass): dinov2's patch version passes the number of masked patches for the same purpose.

    Shapes:
        teacher_out: (B, K) logits (computed in float32).
        valid: (B,) bool or 0/1, or None for all rows.
        gather_distributed: sum over every process's rows.
        returns: (B, K) float32 probabilities, each valid row summing to 1.

    Examples:
        >>> import torch
        >>> from sslkit.losses import sinkhorn_knopp_teacher
        >>> q = sinkhorn_knopp_teacher(torch.randn(6, 4), teacher_temp=0.5)
        >>> torch.allclose(q.sum(1), torch.ones(6))
        True
    """
    reduce = all_reduce_sum if gather_distributed else (lambda t: t)
    q = torch.exp(teacher_out.float() / teacher_temp).t()  # (K, B); float32: exp(1 / 0.05) overflows float16
    if valid is None:
        count = q.new_full((), float(q.shape[1]))
    else:
        q = torch.where(valid.bool(), q, torch.zeros_like(q))  # not a product: padding may overflow to inf
        count = valid.to(q.dtype).sum()
    count = reduce(count)  # rows of the global batch
    prototypes = q.shape[0]
    q /= reduce(q.sum())
    for _ in range(n_iterations):
        q /= reduce(q.sum(dim=1, keepdim=True))  # each prototype: mass 1 ...
        q /= prototypes  # ... then 1/K
        column = q.sum(dim=0, keepdim=True)  # (1, B); 0 for padding rows
        q /= torch.where(column > 0, column, torch.ones_like(column))
        q /= count
    q *= count  # each row sums to 1
    return q.t()
