"""GPU batch augmentation: per-sample random parameters, whole-batch kernels."""

from sslkit.augment.extra import ExtraAugment, extra_from_config
from sslkit.augment.ops import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    gaussian_kernel1d,
    normalize,
    random_grayscale,
    resized_crop_flip,
    rgb_to_grayscale,
    sample_crop_boxes,
    solarize,
)
from sslkit.augment.presets import PRESETS, AsymmetricConfig, MultiCropConfig, augment_config, create_augment
from sslkit.augment.views import MultiView, ViewPipeline, eval_transform

__all__ = [
    "AsymmetricConfig",
    "MultiCropConfig",
    "augment_config",
    "ExtraAugment",
    "MultiView",
    "PRESETS",
    "ViewPipeline",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "create_augment",
    "eval_transform",
    "extra_from_config",
    "gaussian_blur",
    "gaussian_kernel1d",
    "normalize",
    "random_grayscale",
    "resized_crop_flip",
    "rgb_to_grayscale",
    "sample_crop_boxes",
    "solarize",
]
