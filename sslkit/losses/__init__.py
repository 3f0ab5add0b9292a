"""Importable losses: plain ``nn.Module``s, distributed-correct, documented with shapes.

Each loss lightly also has takes lightly's arguments and call, so ``from lightly.loss import X``
becomes ``from sslkit.losses import X`` (lightly's own loss tests run against these in
``tests/lightly_compat``; docs/from_lightly.md lists what is the same and what sslkit adds)."""

from sslkit.losses.barlow_twins import BarlowTwinsLoss
from sslkit.losses.dino import DINOLoss, teacher_temperature
from sslkit.losses.mae import MAELoss
from sslkit.losses.mocov3 import MoCoV3Loss
from sslkit.losses.negative_cosine import NegativeCosineLoss, NegativeCosineSimilarity
from sslkit.losses.ntxent import NTXentLoss
from sslkit.losses.vicreg import VICRegLoss

__all__ = [
    "BarlowTwinsLoss",
    "DINOLoss",
    "MAELoss",
    "MoCoV3Loss",
    "NTXentLoss",
    "NegativeCosineLoss",
    "NegativeCosineSimilarity",
    "VICRegLoss",
    "teacher_temperature",
]
