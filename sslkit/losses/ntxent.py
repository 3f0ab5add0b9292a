"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020, https://arxiv.org/abs/2002.05709.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.distributed import check_gather, gather, rank
from sslkit.errors import ArgumentError
from sslkit.models.memory_bank import MemoryBank


class NTXentLoss(nn.Module):
    """NT-Xent over two batches of projections: each sample's positive is its other view,
    the negatives are all other 2N - 2 samples (2 * world_size * N - 2 with gathering), or,
    with a memory bank, the bank's rows (MoCo's form).

    The same loss, arguments and call as lightly's ``NTXentLoss`` (compared with lightly's
    class in ``tests/test_lightly_compat.py``), computed without a host-device synchronisation:
    lightly removes each anchor's similarity with itself by boolean-mask indexing, whose output
    size the GPU must report back to the host every step, and builds its distributed mask on the
    CPU. Here one (2N, 2M) similarity matrix gets ``-inf`` on those entries instead, which
    removes them from the softmax alike.

    With ``gather_distributed=True`` the projections of every process are all-gathered with
    ``sslkit.distributed.gather``, whose backward sums the gradients of every process's loss,
    so that under DDP's gradient averaging a step with P processes of batch N equals one
    process with batch P * N (``tests/test_distributed.py`` checks it).

    With ``memory_bank_size`` the anchors are the first view's projections, the positive of
    each is its second view, and the negatives are the bank's rows (``sslkit.models.MemoryBank``,
    saved with the loss's state). After the loss is computed, the second view's projections
    are enqueued, when the first view's require a gradient (a training step; lightly's rule,
    which keeps the bank fixed during evaluation), gathered from every process when
    ``gather_distributed``.

    Args:
        temperature: scale of the cosine similarities, 0.5 in lightly's CIFAR-10 benchmark,
            0.1 to 0.2 for ImageNet (MoCo v2: 0.2). Negative values are allowed, as in lightly.
        memory_bank_size: 0 (no bank, SimCLR), lightly's ``(rows, dim)``, or a bare number of
            rows whose dim is taken from the first batch.
        gather_distributed: use the negatives of every process (without a bank), or enqueue
            every process's projections (with one).

    Shapes:
        out0, out1: (N, D) projections of the first and second views (normalised inside).
        returns: scalar, the mean over the 2N anchors of this process (N with a bank).

    Raises:
        ArgumentError (a ValueError): |temperature| < 1e-8, a bad bank size, or
            ``gather_distributed`` without ``torch.distributed``.

    Examples:
        >>> import torch
        >>> from sslkit.losses import NTXentLoss
        >>> loss_fn = NTXentLoss(temperature=0.5)
        >>> z0, z1 = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss_fn(z0, z1).shape
        torch.Size([])
        >>> moco = NTXentLoss(temperature=0.2, memory_bank_size=(4096, 16))
        >>> moco(z0.requires_grad_(), z1).shape
        torch.Size([])
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size: Union[int, Sequence[int]] = 0,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if abs(temperature) < 1e-8:
            raise ArgumentError(f"NTXentLoss needs |temperature| >= 1e-8, got {temperature}: set one such as 0.5")
        check_gather(gather_distributed, "NTXentLoss")
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.memory_bank: Optional[MemoryBank] = None
        if memory_bank_size not in (0, (0,)):
            self.memory_bank = MemoryBank(memory_bank_size, gather_distributed=gather_distributed,
                                          feature_dim_first=False)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if self.memory_bank is not None:
            return self._with_bank(out0, out1)
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

    def _with_bank(self, out0: Tensor, out1: Tensor) -> Tensor:
        q, k = F.normalize(out0, dim=1), F.normalize(out1, dim=1)  # (N, D) each
        _, negatives = self.memory_bank(k, update=out0.requires_grad)  # (K, D): the bank before this batch
        positive = (q * k).sum(1, keepdim=True)  # (N, 1)
        logits = torch.cat([positive, q @ negatives.to(q.dtype).T], dim=1) / self.temperature  # (N, 1 + K)
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
