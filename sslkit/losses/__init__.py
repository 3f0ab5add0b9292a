"""Importable losses: plain ``nn.Module``s, distributed-correct, documented with shapes."""

from sslkit.losses.barlow_twins import BarlowTwinsLoss
from sslkit.losses.dino import DINOLoss, teacher_temperature
from sslkit.losses.mae import MAELoss
from sslkit.losses.mocov3 import MoCoV3Loss
from sslkit.losses.negative_cosine import NegativeCosineLoss
from sslkit.losses.ntxent import NTXentLoss
from sslkit.losses.vicreg import VICRegLoss

__all__ = [
    "BarlowTwinsLoss",
    "DINOLoss",
    "MAELoss",
    "MoCoV3Loss",
    "NTXentLoss",
    "NegativeCosineLoss",
    "VICRegLoss",
    "teacher_temperature",
]
