"""What every method shares: a backbone, a loss on a list of views, hooks the engine calls."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sslkit.config import Config
from sslkit.models import create_backbone
from sslkit.registry import Registry


class Method(nn.Module):
    """A self-supervised method: ``forward(views) -> loss``.

    The engine augments a uint8 batch into views with the recipe's augment preset and calls
    the (Accelerate-wrapped) method on them; everything method-specific lives here.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = create_backbone(cfg.model)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:  # views: V x (B, 3, h, w)
        raise NotImplementedError

    def feature_model(self) -> nn.Module:
        """The network whose features k-NN evaluates (a momentum method returns its teacher)."""
        return self.backbone

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after every optimiser step (momentum encoders update here)."""


METHODS: Registry[Callable[[Config], Method]] = Registry("method")


def create_method(cfg: Config) -> Method:
    return METHODS.get(cfg.method.name)(cfg)
