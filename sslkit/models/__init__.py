"""Backbones (sslkit's and timm's) and projection heads (lightly's, behind sslkit's API)."""

from lightly.models.modules import SimCLRProjectionHead

from sslkit.models.backbones import BACKBONES, TinyCNN, create_backbone

__all__ = ["BACKBONES", "SimCLRProjectionHead", "TinyCNN", "create_backbone"]
