"""A first-in first-out queue of feature rows: MoCo's negatives, NNCLR's support set.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020,
https://arxiv.org/abs/1911.05722 (the queue); Dwibedi et al., "With a Little Help from My
Friends: Nearest-Neighbor Contrastive Learning of Visual Representations", ICCV 2021,
https://arxiv.org/abs/2104.14548 (the support set).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.distributed import check_gather, gather
from sslkit.errors import ArgumentError


class MemoryBank(nn.Module):
    """The last ``size`` rows enqueued, oldest overwritten first.

    The same contents as lightly's ``MemoryBankModule`` when the batch size divides ``size``
    (MoCo's 65,536 and every power of two): both start from random unit rows and write each
    batch after the previous one. When a batch runs past the end, lightly drops the rows that do
    not fit and starts the next batch at row 0; here they wrap around to row 0, so no row of a
    batch is lost. The write position is a device tensor, so enqueueing never makes the host
    wait for the device (lightly reads it back every step).

    Both buffers are persistent: a model (or loss) that owns a bank saves it in its checkpoints
    and a resumed run continues with the same queue. With ``gather_distributed=True`` every
    process enqueues the rows of every process in rank order, so each process holds the same
    bank, and P processes of batch N fill it exactly as one process of batch P * N.

    Args:
        size: the number of rows kept; or lightly's ``(rows, dim)``; ``dim`` may instead be left
            out (None), and is then taken from the first batch (lightly's older bare integer).
        dim: the feature dimension, when ``size`` is an integer.
        gather_distributed: enqueue the rows of every process.

    Shapes:
        bank: (size, dim), unit rows at the start.
        enqueue(rows): rows (N, dim) -> None.
        forward(output, update): output (N, dim) -> (output, the bank as it was before this
            call's update: (dim, size) if ``feature_dim_first`` else (size, dim)).

    Examples:
        >>> import torch
        >>> from sslkit.models import MemoryBank
        >>> bank = MemoryBank(8, dim=4)
        >>> bank.enqueue(torch.ones(3, 4))
        >>> bank.bank[:3].tolist() == torch.ones(3, 4).tolist(), int(bank.ptr)
        (True, 3)
    """

    def __init__(
        self,
        size: Union[int, Sequence[int]],
        dim: Optional[int] = None,
        gather_distributed: bool = False,
        feature_dim_first: bool = True,
    ) -> None:
        super().__init__()
        pair = not isinstance(size, int)
        if isinstance(size, bool) or (pair and (len(size) != 2 or dim is not None)):
            raise ArgumentError(f"MemoryBank size must be rows or (rows, dim), got {size}: pass e.g. (4096, 128)")
        if pair:
            size, dim = size
        if size <= 0 or (dim is not None and dim <= 0):
            raise ArgumentError(f"MemoryBank needs rows > 0 and dim > 0, got rows={size}, dim={dim}")
        check_gather(gather_distributed, "MemoryBank")
        self.size = size
        self.gather_distributed = gather_distributed
        self.feature_dim_first = feature_dim_first
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # the next row to write
        self.bank: Tensor
        self.register_buffer("bank", torch.empty(0))  # allocated now, or by the first batch when dim is None
        if dim is not None:
            self._allocate(dim, self.bank.device)

    def _allocate(self, dim: int, device: torch.device) -> None:
        # random unit rows, as MoCo's queue starts (and lightly's)
        self.bank = F.normalize(torch.randn(self.size, dim), dim=1).to(device)

    @torch.no_grad()
    def enqueue(self, rows: Tensor) -> None:
        """Write ``rows`` (N, dim) after the last rows written (detached, in the bank's dtype)."""
        rows = rows.detach()
        if self.gather_distributed:
            rows = gather(rows)  # (P * N, dim), rank order
        if self.bank.dim() == 1:
            self._allocate(rows.shape[1], rows.device)
        rows = rows[-self.size:]  # a batch larger than the bank: only its last rows stay
        n = len(rows)
        index = (self.ptr + torch.arange(n, device=rows.device)) % self.size  # (n,)
        self.bank.index_copy_(0, index, rows.to(self.bank.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)

    def forward(self, output: Tensor, labels: Any = None, update: bool = False) -> tuple[Tensor, Tensor]:
        """lightly's call: ``output`` and the bank before the update, then enqueue ``output``
        when ``update``. ``labels`` is ignored, as in lightly."""
        if self.bank.dim() == 1:
            self._allocate(output.shape[1], output.device)
        bank = self.bank.clone()  # the update below writes in place; autograd may hold this copy
        if update:
            self.enqueue(output)
        return output, (bank.T if self.feature_dim_first else bank)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # a bank whose dim comes from its first batch has no rows yet: take the saved ones' shape
        saved = state_dict.get(prefix + "bank")
        if saved is not None and self.bank.dim() == 1:
            self.bank = torch.empty_like(saved, device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args)
