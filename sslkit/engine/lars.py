"""LARS over ``torch._foreach_*`` ops, skipping steps on the device (AMP's ``found_inf``)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

# Integer dtypes as wide as each float dtype: a skipped step zeroes gradients through their bits.
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise adaptive rate scaling, from "Large Batch Training of Convolutional
    Networks" (You, Gitman and Ginsburg, 2017) [0]; a drop-in for ``lightly.utils.lars.LARS`` [1].

    Same arguments, parameter-group keys, state (``momentum_buffer``) and update as lightly's:
    for each parameter ``p`` with gradient ``g`` in a group with ``weight_decay`` ``wd > 0``,
    when ``||p|| > 0`` and ``||g|| > 0``::

        g <- (g + wd * p) * trust_coefficient * ||p|| / (||g|| + wd * ||p|| + eps)

    (otherwise ``g`` is left as it is, without weight decay); groups with ``wd == 0`` (biases and
    norms, as in SimCLR and BYOL) are neither decayed nor scaled. Then torch's SGD momentum::

        buf <- g on the first step, else momentum * buf + (1 - dampening) * g
        p <- p - lr * (g + momentum * buf if nesterov else buf)

    What differs from lightly's:

    - The update runs as a couple of dozen ``torch._foreach_*`` and vector ops per step (per
      group, device and dtype), the trust ratios as a vector; only the multiplication by them launches one kernel
      per tensor (foreach has no fused kernel for per-tensor 0-d factors). lightly's loops over
      parameters: ~10 kernels each, and two norms read back on the host (a synchronisation) per
      decayed parameter (161 tensors and 108 host reads per step for a ResNet-50).
    - AMP scaling as in torch's fused optimisers (``_step_supports_amp_scaling``): a
      ``grad_scale`` attribute (0-d tensor, set by ``torch.amp.GradScaler``) divides the
      gradients in place first (``.grad`` is left unscaled, as by fused Adam and SGD), and a
      ``found_inf`` attribute (0-d float tensor) other than 0 makes the step change no parameter
      and no momentum buffer, NaN and Inf gradients included; both are read on the device,
      never on the host. A skipped step still creates the momentum buffers it would have
      created, as zeros: the next step then starts from them, which is the same first step when
      ``dampening == 0`` (with ``dampening > 0`` it takes ``(1 - dampening) * g`` instead of ``g``).
      With ``found_inf`` the momentum and the learning rate become 0-d tensors of the
      parameters' dtype: exact for float32, rounded for float16/bfloat16 parameters.

    - [0]: https://arxiv.org/abs/1708.03888
    - [1]: https://github.com/lightly-ai/lightly/blob/master/lightly/utils/lars.py

    Args:
        params: Parameters or parameter groups (dicts) to optimise.
        lr: Learning rate.
        momentum: Momentum factor.
        dampening: Dampening for momentum.
        weight_decay: Weight decay (L2 penalty); 0 also turns off the trust-ratio scaling.
        nesterov: Nesterov momentum.
        trust_coefficient: Trust coefficient (``eta`` in the paper).
        eps: Added to the trust ratio's denominator.

    Examples:
        >>> model = torch.nn.Linear(10, 1)
        >>> optimizer = LARS(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
        >>> model(torch.randn(4, 10)).square().mean().backward()
        >>> optimizer.step()
        >>> sorted(optimizer.state[model.weight])
        ['momentum_buffer']
        >>> # Under AMP: the step is skipped on the device when found_inf is 1.
        >>> before = model.weight.detach().clone()
        >>> optimizer.found_inf = torch.tensor(1.0)
        >>> model.weight.grad[0, 0] = float("nan")
        >>> optimizer.step()
        >>> del optimizer.found_inf
        >>> torch.equal(model.weight, before)
        True
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, trust_coefficient=trust_coefficient, eps=eps)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """One optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Optional[Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)
        for group in self.param_groups:
            buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    buckets[(p.device, p.dtype)].append(p)
            for (device, _), params in buckets.items():
                self._update(
                    group, params,
                    None if grad_scale is None else grad_scale.to(device),  # as torch's: no-op on the same device
                    None if found_inf is None else found_inf.to(device) == 0,
                )
        return loss

    def _update(self, group: dict[str, Any], params: list[Tensor], grad_scale: Optional[Tensor],
                keep: Optional[Tensor]) -> None:
        """Steps ``params`` (one device and dtype, all with gradients) of ``group``.

        ``keep``: 0-d bool tensor on their device, False to leave parameters and buffers as they are.
        """
        lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
        weight_decay = group["weight_decay"]
        grads = [p.grad for p in params]
        if grad_scale is not None:
            torch._foreach_div_(grads, grad_scale)  # as torch's fused optimisers: .grad is left unscaled
        if keep is not None:
            # Copies of the gradients, zeros on a skipped step. 0 * inf is nan, so floats can't
            # be masked by multiplication: their bits can (integer 0 is +0.0).
            # (One dtype per bucket; the 0-d factor must have it too, for foreach's fast path.)
            bits_dtype = _BITS[grads[0].element_size()]
            bits = torch._foreach_mul([g.view(bits_dtype) for g in grads], keep.to(bits_dtype))
            grads = [b.view(g.dtype) for b, g in zip(bits, grads)]

        if weight_decay != 0:
            # Trust ratios, (n,) for the n parameters. lightly's rule: with ||p|| == 0 the
            # gradient stays as is (p == 0: no decay to add), with ||g|| == 0 it stays 0 (ratio 0),
            # which also holds for the zeroed gradients of a skipped step.
            p_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            ratio = p_norm / (g_norm + p_norm * weight_decay + group["eps"]) * group["trust_coefficient"]
            ratio = torch.where(g_norm == 0, 0.0, torch.where(p_norm == 0, 1.0, ratio))
            if keep is None:
                grads = torch._foreach_add(grads, params, alpha=weight_decay)  # .grad stays as it is
            else:
                torch._foreach_add_(grads, params, alpha=weight_decay)  # into the masked copies
            torch._foreach_mul_(grads, list(ratio.unbind()))  # 0-d factors: one kernel per tensor

        if momentum == 0:
            update = grads
        else:
            states = [self.state[p] for p in params]
            old = [i for i, s in enumerate(states) if "momentum_buffer" in s]
            new = [i for i, s in enumerate(states) if "momentum_buffer" not in s]
            if old:
                bufs = [states[i]["momentum_buffer"] for i in old]
                torch._foreach_mul_(bufs, momentum if keep is None else _choose(keep, momentum, 1.0, bufs[0]))
                torch._foreach_add_(bufs, [grads[i] for i in old], alpha=1 - dampening)
            if new:
                # Copies (x * 1, as torch 2.x may lack _foreach_clone); a skipped step's zeroed
                # gradients make zero buffers.
                for i, buf in zip(new, torch._foreach_mul([grads[i] for i in new], 1.0)):
                    states[i]["momentum_buffer"] = buf
            bufs = [s["momentum_buffer"] for s in states]
            update = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs

        if keep is None:
            torch._foreach_add_(params, update, alpha=-lr)
        else:
            torch._foreach_add_(params, torch._foreach_mul(update, _choose(keep, -lr, 0.0, params[0])))


def _choose(keep: Tensor, kept: float, skipped: float, like: Tensor) -> Tensor:
    """``kept`` if ``keep`` else ``skipped``, as a 0-d tensor of ``like``'s dtype and device,
    chosen on the device (``torch.full`` and ``torch.where`` take the floats as kernel arguments)."""
    return torch.where(keep, torch.full((), kept, dtype=like.dtype, device=like.device), skipped)
