"""Per-method augmentation presets: ``create_augment(cfg)`` builds the views a recipe names.

A preset fixes a method's view structure (how many views, which differ, their sizes); the
strengths (crop scale, jitter, blur sigma, ...) come from the recipe's ``augment`` section.
"""

from __future__ import annotations

from typing import Callable, Sequence

from sslkit.augment.views import MultiView, ViewPipeline
from sslkit.config import AugmentConfig
from sslkit.registry import Registry

PRESETS: Registry[Callable[[AugmentConfig], MultiView]] = Registry("augment preset")


def _view_probs(values: tuple[float, ...], default: Sequence[float], key: str) -> Sequence[float]:
    """``values`` (the recipe's per-view list), or the paper's ``default`` when it is empty."""
    if values and len(values) != len(default):
        raise ValueError(
            f"augment.{key} has {len(values)} values but this preset has {len(default)} kinds of view; "
            f"give {len(default)} (the paper's are {list(default)}) or leave it empty"
        )
    return values or default


@PRESETS.register("simclr")
def simclr(cfg: AugmentConfig) -> MultiView:
    """SimCLR: two views from the same distribution."""
    return MultiView([ViewPipeline(cfg), ViewPipeline(cfg)])


@PRESETS.register("byol")
def byol(cfg: AugmentConfig) -> MultiView:
    """BYOL (also Barlow Twins, VICReg, MoCo v3): two views that differ in blur and solarisation.

    Blur probability 1.0 / 0.1 and solarisation 0.0 / 0.2 for the first / second view
    (Grill et al. 2020, table 6), unless ``augment.view_blur_probs`` / ``view_solarize_probs`` say
    otherwise.
    """
    blur = _view_probs(cfg.view_blur_probs, (1.0, 0.1), "view_blur_probs")
    solarize = _view_probs(cfg.view_solarize_probs, (0.0, 0.2), "view_solarize_probs")
    return MultiView([ViewPipeline(cfg, blur_prob=b, solarize_prob=s) for b, s in zip(blur, solarize)])


@PRESETS.register("multicrop")
def multicrop(cfg: AugmentConfig) -> MultiView:
    """DINO's multi-crop: two global views (``size``, ``scale``) and ``local_crops`` local views
    (``local_size``, ``local_scale``), in that order.

    Blur 1.0 / 0.1 / 0.5 and solarisation 0.0 / 0.2 / 0.0 for the first global, second global
    and every local view (Caron et al. 2021, DINO's ``DataAugmentationDINO``), unless
    ``augment.view_blur_probs`` / ``view_solarize_probs`` give three values.
    """
    blur = _view_probs(cfg.view_blur_probs, (1.0, 0.1, 0.5), "view_blur_probs")
    solarize = _view_probs(cfg.view_solarize_probs, (0.0, 0.2, 0.0), "view_solarize_probs")
    global_views = [ViewPipeline(cfg, blur_prob=blur[i], solarize_prob=solarize[i]) for i in (0, 1)]
    local = ViewPipeline(
        cfg, size=cfg.local_size, scale=cfg.local_scale, blur_prob=blur[2], solarize_prob=solarize[2],
        blur_kernel=local_blur_kernel(cfg),
    )
    return MultiView(global_views + [local] * cfg.local_crops)


def local_blur_kernel(cfg: AugmentConfig) -> int:
    """The local views' kernel: ``augment.blur_kernel`` scaled to ``local_size`` (odd, at least
    3), or 0 (the size's default) when the recipe leaves the kernel to the view size."""
    if not cfg.blur_kernel:
        return 0
    return max(3, 2 * round((cfg.blur_kernel * cfg.local_size / cfg.size - 1) / 2) + 1)


@PRESETS.register("single")
def single(cfg: AugmentConfig) -> MultiView:
    """One view (MAE: the recipe sets a crop of scale 0.2-1 and a flip, no colour changes)."""
    return MultiView([ViewPipeline(cfg)])


def create_augment(cfg: AugmentConfig) -> MultiView:
    """The views of ``cfg.preset``, parameterised by ``cfg``."""
    return PRESETS.get(cfg.preset)(cfg)
