"""Momentum (EMA) encoders: a slowly moving copy of a network that provides targets."""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from sslkit.schedules import cosine


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, end: float = 1.0) -> float:
    """BYOL's schedule: ``end - (end - base) * (cos(pi * step / total_steps) + 1) / 2``.

    ``base`` at step 0, rising to ``end`` at ``total_steps``.
    """
    return cosine(step, total_steps, base, end)


class MomentumEncoder(nn.Module):
    """An exponential moving average of ``module``'s weights (BYOL's target, DINO's teacher).

    It starts as a copy of ``module``, or, with ``source``, it is ``module`` itself (built on
    purpose, e.g. without the online network's stochastic depth) started from ``source``'s
    weights and buffers (the same state-dict keys). Its parameters never require gradients, so the
    optimiser and DDP's gradient synchronisation leave them alone, while ``state_dict`` (and
    so every checkpoint) includes them. Call ``update(module, momentum)`` after each
    optimiser step: ``ema = momentum * ema + (1 - momentum) * online`` for every parameter.
    Buffers (BatchNorm running statistics) are the copy's own, from its own forward passes,
    as in BYOL's and DINO's code, so that they describe the copy's activations.

    Shapes: whatever ``module`` maps; ``forward`` runs without autograd.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from sslkit.models import MomentumEncoder, cosine_momentum
        >>> online = nn.Linear(4, 2)
        >>> teacher = MomentumEncoder(online)
        >>> teacher.update(online, cosine_momentum(step=0, total_steps=100, base=0.99))
        >>> teacher(torch.randn(3, 4)).requires_grad
        False
    """

    def __init__(self, module: nn.Module, source: Optional[nn.Module] = None) -> None:
        super().__init__()
        if source is None:
            self.module = copy.deepcopy(module)
        else:
            self.module = module
            self.module.load_state_dict(source.state_dict())
        self.module.requires_grad_(False)

    @torch.no_grad()
    def forward(self, *args: object, **kwargs: object) -> object:
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, module: nn.Module, momentum: float, applied: torch.Tensor | None = None) -> None:
        """EMA step towards ``module`` (the same architecture as the copy). ``applied``: a 0-d
        tensor that scales the step (0 leaves the copy as it is) without a host read."""
        ema = list(self.module.parameters())
        online = list(module.parameters())
        if len(ema) != len(online):
            raise ValueError("MomentumEncoder.update needs the module it was copied from")
        weight = 1.0 - momentum if applied is None else (1.0 - momentum) * applied
        torch._foreach_lerp_(ema, online, weight)
