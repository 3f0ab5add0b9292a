"""Importable losses: plain ``nn.Module``s, distributed-correct, documented with shapes.

Each loss lightly also has takes lightly's arguments and call, so ``from lightly.loss import X``
becomes ``from sslkit.losses import X`` (each compared with lightly's class in
``tests/test_lightly_compat.py``; docs/from_lightly.md lists what is the same and what sslkit adds)."""

from sslkit.losses.barlow_twins import BarlowTwinsLoss
from sslkit.losses.dino import DINOLoss, teacher_temperature
from sslkit.losses.ibot import IBOTPatchLoss
from sslkit.losses.ijepa import IJEPALoss
from sslkit.losses.koleo import KoLeoLoss
from sslkit.losses.mae import MAELoss
from sslkit.losses.mocov3 import MoCoV3Loss
from sslkit.losses.negative_cosine import NegativeCosineLoss, NegativeCosineSimilarity
from sslkit.losses.ntxent import NTXentLoss
from sslkit.losses.sinkhorn_knopp import sinkhorn_knopp_teacher
from sslkit.losses.swav import SwaVLoss, SwAVLoss
from sslkit.losses.vicreg import VICRegLoss

__all__ = [
    "BarlowTwinsLoss",
    "DINOLoss",
    "IBOTPatchLoss",
    "IJEPALoss",
    "KoLeoLoss",
    "MAELoss",
    "MoCoV3Loss",
    "NTXentLoss",
    "NegativeCosineLoss",
    "NegativeCosineSimilarity",
    "SwAVLoss",
    "SwaVLoss",
    "VICRegLoss",
    "sinkhorn_knopp_teacher",
    "teacher_temperature",
]
