"""The processes of a ``torch.distributed`` run: how many, which one this is, and the
collectives every loss and ``sslkit.models.SyncBatchNorm`` use.

Every function works without ``torch.distributed`` (not built in, or no process group
initialised): the run is then one process, ``world_size() == 1``, ``rank() == 0``, and the
collectives return their input. The collectives are those gloo (CPU) has as well as NCCL, so
the 2-process CPU tests exercise the same code as a GPU run.

Examples:
    >>> import torch
    >>> from sslkit.distributed import gather, rank, world_size
    >>> world_size(), rank()  # one process here
    (1, 0)
    >>> z = torch.randn(4, 8)
    >>> gather(z) is z  # (world_size * 4, 8) under several processes
    True
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from sslkit.errors import ArgumentError


def check_gather(gather_distributed: bool, owner: str) -> None:
    """Refuse ``gather_distributed=True`` where this torch has no ``torch.distributed`` (some
    macOS and Windows builds): ``owner`` (a loss's name) would silently use one process's batch.

    Raises:
        ArgumentError (a ValueError, as lightly's losses raise): naming ``owner`` and the fix.
    """
    if gather_distributed and not dist.is_available():
        raise ArgumentError(
            f"{owner}(gather_distributed=True) needs torch.distributed, which this torch build lacks: "
            "set gather_distributed=False or install a torch build with distributed support"
        )


def world_size() -> int:
    """The number of processes; 1 when ``torch.distributed`` is unavailable or not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's index in ``[0, world_size())``; 0 when ``torch.distributed`` is unavailable
    or not initialised."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _Gather(torch.autograd.Function):
    """``gather``'s forward and backward; see there."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        # all_gather into a list, not all_gather_into_tensor: gloo lacks the latter before torch 2.3
        rows = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, tensor.contiguous())
        return torch.cat(rows)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Every process's loss uses every row: this process's rows get the sum over processes of
        # their gradients. A reduce-scatter would send less, but gloo has none: all-reduce all.
        grad = all_reduce_sum(grad.contiguous().clone())  # clone: all_reduce works in place
        rows = grad.shape[0] // dist.get_world_size()
        return grad.narrow(0, dist.get_rank() * rows, rows)


def gather(tensor: Tensor) -> Tensor:
    """Every process's ``tensor``, concatenated along dim 0 in rank order; differentiable.

    Backward: each process gets the gradient of the sum of all processes' losses w.r.t. its
    own rows (every process's loss uses every row), so that with DDP's gradient averaging P
    processes of N rows step as one process of P * N rows would on the mean of their losses.
    ``torch.distributed.nn``'s all_gather does the same, but torch 2.14 deprecates it and
    torch.compile refuses it. A tensor that needs no gradient is gathered alike.

    Shapes:
        tensor: (N, *), the same shape and dtype on every process.
        returns: (world_size() * N, *), rows ``r * N : (r + 1) * N`` from rank r; ``tensor``
            itself with one process.
    """
    if world_size() == 1:
        return tensor
    return _Gather.apply(tensor)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The elementwise sum of ``tensor`` over all processes, written into ``tensor`` (in place,
    as ``dist.all_reduce``) and returned. Not differentiable.

    Shapes: tensor (*), the same shape and dtype on every process -> the same tensor.
    """
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The elementwise mean of ``tensor`` over all processes, in place as :func:`all_reduce_sum`
    and returned. A floating-point tensor: an integer one cannot hold the mean.

    Shapes: tensor (*), the same shape and dtype on every process -> the same tensor.
    """
    # sum, then divide: ReduceOp.AVG exists on NCCL only
    return all_reduce_sum(tensor).div_(world_size())
