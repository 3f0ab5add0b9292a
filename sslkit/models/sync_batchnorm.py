"""BatchNorm with statistics over the global batch, on any torch.distributed backend.

``torch.nn.SyncBatchNorm`` runs only on GPU-like devices, so on CPU (gloo) each process
normalises with its own statistics and 2 processes x B samples do not step like 1 process
x 2B. :class:`SyncBatchNorm` computes the statistics with plain tensor ops and one
all-gather, so it works wherever ``torch.distributed`` does (gloo, NCCL).
"""

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from sslkit.distributed import gather, world_size


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of all processes, for inputs ``(N, C, ...)`` of any rank.

    A drop-in for ``nn.BatchNorm1d/2d/3d`` (same arguments, parameters, buffers and state-dict
    keys). In training with more than one process, each process computes per channel the
    count, mean and biased variance of its ``N * prod(...)`` values; one all-gather and
    Chan's parallel formula give the global mean and biased variance, used to normalise, and
    the running statistics are updated with the unbiased variance and the momentum (``None``:
    cumulative average) as BatchNorm does for the concatenated batch. Processes may hold
    different batch sizes (even 0). Statistics are float32 (at least) under autocast; the
    output has the input's dtype. In eval mode, or with one process, it is nn.BatchNorm.

    Gradients: each process's loss depends on its own samples and on the global statistics,
    which depend on every process's local statistics. The all-gather's backward
    (``sslkit.distributed.gather``) sums, over the processes, the gradients w.r.t. this
    process's local statistics, so each process gets the gradient of the sum of all
    processes' losses w.r.t. its own samples and parameters; once DDP averages the parameter
    gradients, the step equals one process's step on the concatenated batch (for
    per-process losses that are means over equal shares).

    Shapes: input ``(N, C)`` or ``(N, C, *)`` -> output of the same shape and dtype.

    Examples:
        >>> bn = SyncBatchNorm(16)                  # or convert_sync_batchnorm(model)
        >>> bn(torch.randn(8, 16, 4, 4)).shape
        torch.Size([8, 16, 4, 4])
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D input")

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or world_size() == 1:
            return super().forward(input)  # exactly nn.BatchNorm
        self._check_input_dim(input)

        # float32 (or float64) statistics even when autocast hands us bf16/fp16 activations
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        dims = [0, *range(2, x.dim())]
        channels = x.size(1)
        count = input.numel() // max(channels, 1)
        if count:  # local mean and biased variance: Welford's, accurate when |mean| >> std
            var, mean = torch.var_mean(x, dims, correction=0)
        else:  # an empty local batch still takes part in the collectives
            var = mean = x.sum(dims)
        # one collective; per-process counts may differ
        stats = gather(torch.cat([x.new_full((1,), count), mean, var])[None])  # (world_size, 1 + 2C)
        counts, means, vars_ = stats.split([1, channels, channels], dim=1)  # (world_size, *)
        # Chan et al.'s combination of the per-process (count, mean, variance); not
        # E[x^2] - E[x]^2, which loses ~1e-4 of a float32 variance when |mean| ~ 30 std
        n = counts.sum(0)
        mean = (counts * means).sum(0) / n
        var = (counts * (vars_ + (means - mean) ** 2)).sum(0) / n

        if self.track_running_stats and self.num_batches_tracked is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # a tensor factor for the cumulative average: no host sync on GPU
                factor = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - factor).add_(factor * unbiased.to(self.running_var.dtype))

        # y = x * scale + shift with scale = w / std, shift = b - mean * scale (as CPU BatchNorm)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        shape = (1, channels) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(shape), x, scale.view(shape)).to(input.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (any ``_BatchNorm``, torch's SyncBatchNorm included) by :class:`SyncBatchNorm`.

    The new modules hold the same weight/bias Parameter objects (so ``requires_grad``, e.g. of a
    frozen EMA copy, and optimiser references survive) and the same buffers, and keep the
    training flag. Returns ``module`` changed in place, or the new module when ``module``
    itself is a BatchNorm (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``).

    Examples:
        >>> model = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
        >>> type(model[1]).__name__
        'SyncBatchNorm'
    """
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        # on "meta": allocate nothing, everything is replaced by the old module's tensors below
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, device="meta", bias=module.bias is not None)
        out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child))
    return out


__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]
