"""Per-method augmentation presets: ``create_augment(cfg)`` builds the views a recipe names.

A preset fixes a method's view structure (how many views, which differ, their sizes); the
strengths (crop scale, jitter, blur sigma, ...) come from the recipe's ``augment`` section.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from pydantic import Field, ValidationInfo, field_validator

from torch import nn

from sslkit.augment.extra import extra_from_config
from sslkit.augment.views import MultiView, ViewPipeline
from sslkit.config import AugmentConfig, Count, FractionRange, Probability
from sslkit.registry import Registry

PRESETS: Registry[Callable[[AugmentConfig], MultiView]] = Registry("augment preset", AugmentConfig)


class AsymmetricConfig(AugmentConfig):
    """Views that differ in blur and solarisation probability, one value per kind of view."""

    preset: str = "byol"
    view_blur_probs: tuple[Probability, ...] = (1.0, 0.1)  # first view, second view (BYOL, table 6)
    view_solarize_probs: tuple[Probability, ...] = (0.0, 0.2)

    @field_validator("view_blur_probs", "view_solarize_probs")
    @classmethod
    def _one_per_kind(cls, probs: tuple[float, ...], info: ValidationInfo) -> tuple[float, ...]:
        kinds = len(cls.model_fields[info.field_name].default)
        if len(probs) != kinds:
            preset = cls.model_fields["preset"].default
            raise ValueError(f"expected {kinds} values, one per kind of view of preset {preset!r}")
        return probs


class MultiCropConfig(AsymmetricConfig):
    """DINO's multi-crop: two global views (``size``, ``scale``) and ``local_crops`` small ones."""

    preset: str = "multicrop"
    scale: FractionRange = (0.4, 1.0)  # DINO's global_crops_scale
    view_blur_probs: tuple[Probability, ...] = (1.0, 0.1, 0.5)  # first global, second global, every local
    view_solarize_probs: tuple[Probability, ...] = (0.0, 0.2, 0.0)
    local_crops: int = Field(8, ge=0)  # main_dino.py's local_crops_number
    local_size: Count = 96
    local_scale: FractionRange = (0.05, 0.4)


class CropConfig(AugmentConfig):
    """One view: a random resized crop and nothing else (I-JEPA's augmentation)."""

    preset: str = "crop"
    scale: FractionRange = (0.3, 1.0)  # I-JEPA's crop_scale
    hflip_prob: Probability = 0.0
    jitter_prob: Probability = 0.0
    gray_prob: Probability = 0.0


class FinetuneAugmentConfig(AugmentConfig):
    """Supervised fine-tuning (``sslkit eval finetune``): one view, a flip and a random resized crop
    (``eval finetune --min-scale``; whole images by default), no colour changes (the class may
    depend on colour; the backbone has seen them)."""

    preset: str = "finetune"
    scale: FractionRange = (1.0, 1.0)
    jitter_prob: Probability = 0.0
    gray_prob: Probability = 0.0


@PRESETS.register("simclr")
def simclr(cfg: AugmentConfig) -> MultiView:
    """SimCLR: two views from the same distribution."""
    return MultiView([ViewPipeline(cfg), ViewPipeline(cfg)])


@PRESETS.register("byol", config=AsymmetricConfig)
def byol(cfg: AsymmetricConfig) -> MultiView:
    """BYOL (also Barlow Twins, VICReg, MoCo v3): two views that differ in blur and solarisation.

    Blur probability 1.0 / 0.1 and solarisation 0.0 / 0.2 for the first / second view
    (Grill et al. 2020, table 6) by default: ``augment.view_blur_probs`` / ``view_solarize_probs``.
    """
    probs = zip(cfg.view_blur_probs, cfg.view_solarize_probs)
    return MultiView([ViewPipeline(cfg, blur_prob=b, solarize_prob=s) for b, s in probs])


@PRESETS.register("multicrop", config=MultiCropConfig)
def multicrop(cfg: MultiCropConfig) -> MultiView:
    """DINO's multi-crop: two global views (``size``, ``scale``) and ``local_crops`` local views
    (``local_size``, ``local_scale``), in that order.

    Blur 1.0 / 0.1 / 0.5 and solarisation 0.0 / 0.2 / 0.0 for the first global, second global
    and every local view (Caron et al. 2021, DINO's ``DataAugmentationDINO``) by default:
    ``augment.view_blur_probs`` / ``view_solarize_probs``.
    """
    blur, solarize = cfg.view_blur_probs, cfg.view_solarize_probs
    global_views = [ViewPipeline(cfg, blur_prob=blur[i], solarize_prob=solarize[i]) for i in (0, 1)]
    local = ViewPipeline(
        cfg, size=cfg.local_size, scale=cfg.local_scale, blur_prob=blur[2], solarize_prob=solarize[2],
        blur_kernel=local_blur_kernel(cfg),
    )
    return MultiView(global_views + [local] * cfg.local_crops)


def local_blur_kernel(cfg: MultiCropConfig) -> int:
    """The local views' kernel: ``augment.blur_kernel`` scaled to ``local_size`` (odd, at least
    3), or 0 (the size's default) when the recipe leaves the kernel to the view size."""
    if not cfg.blur_kernel:
        return 0
    return max(3, 2 * round((cfg.blur_kernel * cfg.local_size / cfg.size - 1) / 2) + 1)


@PRESETS.register("single")
def single(cfg: AugmentConfig) -> MultiView:
    """One view (MAE: the recipe sets a crop of scale 0.2-1 and a flip, no colour changes)."""
    return MultiView([ViewPipeline(cfg)])


@PRESETS.register("crop", config=CropConfig)
def crop(cfg: CropConfig) -> MultiView:
    """One view, a random resized crop only by default (I-JEPA: no flip, no colour changes);
    the recipe's keys may add more."""
    return MultiView([ViewPipeline(cfg)])


@PRESETS.register("finetune", config=FinetuneAugmentConfig)
def finetune(cfg: FinetuneAugmentConfig) -> MultiView:
    """One view for supervised fine-tuning: a flip (and crops when ``scale`` allows) by default."""
    return MultiView([ViewPipeline(cfg)])


def augment_config(preset: str = "simclr", **keys: Any) -> AugmentConfig:
    """The config of augment preset ``preset`` with ``keys``, its own keys included
    (``augment_config("multicrop", local_crops=4)``: a ``MultiCropConfig``)."""
    return PRESETS.config(preset)(preset=preset, **keys)


def create_augment(cfg: AugmentConfig, extra: Sequence[nn.Module] = ()) -> MultiView:
    """The views of ``cfg.preset``, parameterised by ``cfg``, extended with the kornia
    augmentations of ``cfg.extra`` and then the modules ``extra`` (see ``MultiView``). A base
    ``AugmentConfig`` naming a preset with keys of its own gets that preset's defaults for them."""
    own = PRESETS.config(cfg.preset)
    if not isinstance(cfg, own):
        cfg = own.model_validate(cfg.model_dump(exclude_unset=True))
    views = PRESETS.get(cfg.preset)(cfg)
    return MultiView(views.pipelines, [*extra_from_config(cfg.extra), *extra])
