"""What every method shares: a backbone, an online probe, hooks the engine calls."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sslkit.config import Config
from sslkit.models import create_backbone
from sslkit.registry import Registry


class Method(nn.Module):
    """A self-supervised method: ``forward(views, labels) -> {"loss", ...}``.

    The engine augments a uint8 batch into views with the recipe's augment preset and calls
    the (Accelerate-wrapped) method on them. A subclass implements ``ssl_step``; this class
    adds the online linear probe (``num_classes`` given): a linear head on the detached
    backbone features of the first view, so it measures the representation without
    shaping it.

    The engine keeps ``step`` (optimiser steps done), ``steps_per_epoch`` and ``total_steps``
    current through ``set_progress`` for schedules inside a method (EMA momentum, DINO's
    teacher temperature), and hands over its augmentation ``generator`` and ``shard``
    ``(rank, world_size)`` for random draws inside a step (MAE's masks), which then follow the
    same rules as the views: saved with checkpoints, the same however a batch is split.
    """

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = create_backbone(cfg.model)
        # The probe draws its init from a forked RNG, so that the method's own modules start from
        # the same weights with or without it (and as the same method outside sslkit).
        with torch.random.fork_rng(devices=[]):
            self.online_probe = nn.Linear(self.backbone.num_features, num_classes) if num_classes else None
        self.step, self.steps_per_epoch, self.total_steps = 0, 1, 1
        self.generator: Optional[torch.Generator] = None  # None: torch's default generator
        self.shard = (0, 1)

    def set_progress(self, step: int, steps_per_epoch: int, total_steps: int) -> None:
        """Called by the engine before each optimiser step."""
        self.step, self.steps_per_epoch, self.total_steps = step, steps_per_epoch, total_steps

    @property
    def epoch(self) -> float:
        """Fractional epochs done, for schedules given in epochs."""
        return self.step / self.steps_per_epoch

    def ssl_step(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """views: V x (B, 3, h, w) -> (loss, backbone features (B, D) of the first view)."""
        raise NotImplementedError

    def forward(self, views: list[torch.Tensor], labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Returns ``loss`` (to minimise), ``ssl_loss``, detached ``features`` (B, D) and, with
        the probe and labels, ``online_correct`` (scalar count over the B samples)."""
        ssl_loss, features = self.ssl_step(views)
        out = {"loss": ssl_loss, "ssl_loss": ssl_loss.detach(), "features": features.detach()}
        if self.online_probe is not None and labels is not None:
            logits = self.online_probe(features.detach().float())  # (B, C)
            out["loss"] = ssl_loss + F.cross_entropy(logits, labels)
            out["online_correct"] = (logits.argmax(1) == labels).sum()
        return out

    def feature_model(self) -> nn.Module:
        """The network whose features k-NN evaluates (a momentum method returns its teacher)."""
        return self.backbone

    def compile_targets(self) -> list[nn.Module]:
        """The networks ``train.compile`` compiles: those that do most of the step's work."""
        return [self.backbone]

    def before_optimizer_step(self) -> None:
        """Called when the gradients of a step are complete, before the optimiser uses them
        (DINO drops its last layer's gradients here during the first epoch)."""

    def after_optimizer_step(self, applied: torch.Tensor) -> None:
        """Called after every optimiser step (momentum encoders update here). ``applied`` is a
        0-d float tensor on the device: 1 when the step was applied, 0 when it was skipped for
        non-finite gradients. It stays on the device so that the step needs no host read:
        multiply an update by it rather than branch on it."""


METHODS: Registry[Callable[..., Method]] = Registry("method")


def create_method(cfg: Config, num_classes: Optional[int] = None) -> Method:
    """``cfg.method.name``'s method; with ``num_classes``, an online probe of that many classes."""
    return METHODS.get(cfg.method.name)(cfg, num_classes)
