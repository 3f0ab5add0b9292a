"""Backbones by name: sslkit's own small ones, then any timm model.

Every backbone maps images (B, 3, H, W) to features (B, num_features) and has the attribute
``num_features``.
"""

from __future__ import annotations

from typing import Callable

import timm
import torch
from torch import nn

from sslkit.config import ModelConfig
from sslkit.errors import UserError
from sslkit.registry import Registry, did_you_mean

BACKBONES: Registry[Callable[[ModelConfig], nn.Module]] = Registry("backbone")

_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "batch": nn.BatchNorm2d,
    "group": lambda c: nn.GroupNorm(8, c),
    "none": lambda c: nn.Identity(),
}


class TinyCNN(nn.Module):
    """Four 3x3 conv blocks (stride 1, 2, 2, 2) and global average pooling.

    Sized for 28-32 px images on a CPU: about 13 M multiply-adds per 28 px image at width 32.
    """

    def __init__(self, width: int = 32, norm: str = "batch", in_chans: int = 3) -> None:
        super().__init__()
        if norm not in _NORMS:
            raise UserError(f"model.norm must be one of {sorted(_NORMS)}, got '{norm}'")
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip([in_chans, *widths[:-1]], widths)):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, bias=norm == "none"),
                _NORMS[norm](c_out),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.num_features = widths[-1]
        # timm's interface, so per-layer probes and moment probing treat it as a timm CNN: the
        # output of each block's ReLU, and the unpooled map followed by its pooling.
        self.feature_info = [{"module": f"features.{3 * i + 2}", "num_chs": c, "reduction": 2 ** i}
                             for i, c in enumerate(widths)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 8 * width, h, w)
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:  # (B, C, h, w) -> (B, C)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 8 * width)
        return self.forward_head(self.forward_features(x))


@BACKBONES.register("tiny_cnn")
def _tiny_cnn(cfg: ModelConfig) -> nn.Module:
    return TinyCNN(cfg.width, cfg.norm)


def _use_small_stem(model: nn.Module, name: str) -> None:
    """3x3 stride-1 first conv and no max-pool, so 28-32 px images keep their resolution."""
    if not (isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool")):
        raise UserError(
            f"model.small_stem=true needs a ResNet-style backbone (conv1 + maxpool); '{name}' has "
            "neither. Use a resnet*, or set model.small_stem=false."
        )
    old = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def check_backbone_name(name: str) -> str:
    """``name`` if it is an sslkit backbone or a timm model, else a ValueError naming the nearest
    (``ModelConfig`` validates ``model.backbone`` with it)."""
    if name in BACKBONES or timm.is_model(name):
        return name
    raise ValueError(
        f"unknown backbone{did_you_mean(name, BACKBONES.names() + timm.list_models())}: neither an sslkit "
        f"backbone ({', '.join(BACKBONES.names())}) nor a timm model (see timm.list_models())"
    )


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """A backbone without classifier: an sslkit one by name, else ``timm.create_model``.

    Weights are never downloaded: ``pretrained=False`` always. ``cfg.timm_kwargs`` go to timm
    (e.g. ``img_size``, ``patch_size``, ``dynamic_img_size`` for a ViT on small or multi-size views).
    """
    if cfg.backbone in BACKBONES:  # the config has checked the name
        model = BACKBONES.get(cfg.backbone)(cfg)
    else:
        try:
            model = timm.create_model(cfg.backbone, pretrained=False, num_classes=0, **cfg.timm_kwargs)
        except TypeError as err:  # a keyword the model does not take
            raise UserError(f"model.timm_kwargs={cfg.timm_kwargs}: {cfg.backbone} rejects them ({err})") from None
    if cfg.small_stem:
        _use_small_stem(model, cfg.backbone)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
