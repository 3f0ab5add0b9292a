"""Methods by name: ``create_method(cfg)`` looks up ``cfg.method.name`` in ``METHODS``."""

from sslkit.methods.base import METHODS, Method, create_method
from sslkit.methods.simclr import SimCLR

__all__ = ["METHODS", "Method", "SimCLR", "create_method"]
