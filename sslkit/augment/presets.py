"""Per-method augmentation presets: ``create_augment(cfg)`` builds the views a recipe names."""

from __future__ import annotations

from typing import Callable

from sslkit.augment.views import MultiView, ViewPipeline
from sslkit.config import AugmentConfig
from sslkit.registry import Registry

PRESETS: Registry[Callable[[AugmentConfig], MultiView]] = Registry("augment preset")


@PRESETS.register("simclr")
def simclr(cfg: AugmentConfig) -> MultiView:
    """SimCLR: two views from the same distribution."""
    return MultiView([ViewPipeline(cfg), ViewPipeline(cfg)])


def create_augment(cfg: AugmentConfig) -> MultiView:
    """The views of ``cfg.preset``, parameterised by ``cfg``."""
    return PRESETS.get(cfg.preset)(cfg)
