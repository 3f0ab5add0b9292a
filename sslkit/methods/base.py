"""What every method shares: a backbone, an online probe, hooks the engine calls, and the
registry that turns ``method.name`` into a method with its own config."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.config import Config, MethodConfig
from sslkit.models import create_backbone
from sslkit.registry import Registry
from sslkit.schedules import Schedules

LossTerms = dict[str, Tensor]  # a method's loss terms by name (scalars); the loss is their sum


class Method(nn.Module):
    """A self-supervised method: ``forward(views, labels) -> {"loss", ...}``.

    The engine augments a uint8 batch into views with the recipe's augment preset and calls
    the (Accelerate-wrapped) method on them. A subclass implements ``ssl_step``, which returns
    its loss terms by name (logged as ``loss/<name>``) and the backbone features of the first
    view; this class adds the online linear probe (``num_classes`` given): a linear head on the
    detached features, so it measures the representation without shaping it.

    Schedules: a method declares its own in ``schedules`` (EMA momentum, DINO's teacher
    temperature, ...), computed once before training; before each optimiser step the engine puts
    that step's values in ``self.scheduled``. The engine also hands over its augmentation
    ``generator`` and ``shard`` ``(rank, world_size)`` for random draws inside a step (MAE's
    masks), which then follow the same rules as the views: saved with checkpoints, the same
    however a batch is split.
    """

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = create_backbone(cfg.model)
        # The probe draws its init from a forked RNG, so that the method's own modules start from
        # the same weights with or without it (and as the same method outside sslkit).
        with torch.random.fork_rng(devices=[]):
            self.online_probe = nn.Linear(self.backbone.num_features, num_classes) if num_classes else None
        self.scheduled: dict[str, float] = {}
        self.generator: Optional[torch.Generator] = None  # None: torch's default generator
        self.shard = (0, 1)

    @property
    def config(self) -> Any:
        """This method's own section of the config (``cfg.method``, of the method's config class)."""
        return self.cfg.method

    def schedules(self, steps_per_epoch: int, total_steps: int) -> Schedules:
        """The method's per-step schedules by name (none by default)."""
        return {}

    def ssl_step(self, views: list[Tensor]) -> tuple[LossTerms, Tensor]:
        """views: V x (B, 3, h, w) -> (loss terms by name, backbone features (B, D) of the first view)."""
        raise NotImplementedError

    def forward(self, views: list[Tensor], labels: Optional[Tensor] = None) -> dict[str, Any]:
        """Returns ``loss`` (to minimise), detached ``ssl_loss`` (the terms' sum) and ``terms``,
        detached ``features`` (B, D) and, with the probe and labels, ``online_correct`` (scalar
        count over the B samples)."""
        terms, features = self.ssl_step(views)
        ssl_loss = sum(terms.values())
        out = {"loss": ssl_loss, "ssl_loss": ssl_loss.detach(), "features": features.detach(),
               "terms": {name: term.detach() for name, term in terms.items()}}
        if self.online_probe is not None and labels is not None:
            logits = self.online_probe(features.detach().float())  # (B, C)
            out["loss"] = ssl_loss + F.cross_entropy(logits, labels)
            out["online_correct"] = (logits.argmax(1) == labels).sum()
        return out

    def feature_model(self) -> nn.Module:
        """The network whose features k-NN evaluates (a momentum method returns its teacher)."""
        return self.backbone

    def feature_projection(self) -> Optional[nn.Module]:
        """The projection head applied to ``feature_model()``'s output, or None for a method without
        one (MAE, I-JEPA): the representation after the head, for per-layer probes."""
        return getattr(self, "projection_head", None)

    def compile_targets(self) -> list[nn.Module]:
        """The networks ``train.compile`` compiles: those that do most of the step's work."""
        return [self.backbone]

    def before_optimizer_step(self) -> None:
        """Called when the gradients of a step are complete, before the optimiser uses them
        (DINO drops its last layer's gradients here while it is frozen)."""

    def after_optimizer_step(self, applied: Tensor) -> None:
        """Called after every optimiser step (momentum encoders update here). ``applied`` is a
        0-d float tensor on the device: 1 when the step was applied, 0 when it was skipped for
        non-finite gradients. It stays on the device so that the step needs no host read:
        multiply an update by it rather than branch on it."""


METHODS: Registry[Callable[..., Method]] = Registry("method", MethodConfig)


def create_method(cfg: Config, num_classes: Optional[int] = None) -> Method:
    """``cfg.method.name``'s method; with ``num_classes``, an online probe of that many classes."""
    return METHODS.get(cfg.method.name)(cfg, num_classes)
