"""Methods by name: ``create_method(cfg)`` looks up ``cfg.method.name`` in ``METHODS``."""

from sslkit.methods.base import METHODS, Method, create_method
from sslkit.methods.mae import MAE
from sslkit.methods.momentum import BYOL, DINO, MoCoV3, MomentumMethod
from sslkit.methods.two_view import BarlowTwins, SimCLR, TwoViewMethod, VICReg

__all__ = [
    "BYOL",
    "DINO",
    "MAE",
    "METHODS",
    "BarlowTwins",
    "Method",
    "MoCoV3",
    "MomentumMethod",
    "SimCLR",
    "TwoViewMethod",
    "VICReg",
    "create_method",
]
