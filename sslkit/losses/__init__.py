"""Importable losses: plain ``nn.Module``s, distributed-correct, documented with shapes."""

from sslkit.losses.ntxent import NTXentLoss

__all__ = ["NTXentLoss"]
