"""Checks the losses share: arguments that have lightly's name and sslkit's, inputs that must
pair up. Each failure is an ``ArgumentError`` (a ``ValueError``) that names the loss."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from sslkit.errors import ArgumentError


def pick_name(owner: str, lightly: tuple[str, float, float], sslkit: tuple[str, Optional[float]]) -> float:
    """The value of a parameter spelled both ways: ``lightly = (name, value, default)``,
    ``sslkit = (name, value or None)``. sslkit's when given, else lightly's; both given with
    different values is refused rather than one silently winning."""
    (lightly_name, lightly_value, default), (sslkit_name, sslkit_value) = lightly, sslkit
    if sslkit_value is None:
        return lightly_value
    if lightly_value != default and lightly_value != sslkit_value:
        raise ArgumentError(f"{owner} got {lightly_name}={lightly_value} and {sslkit_name}={sslkit_value}, two names "
                            "of one parameter: give one of them")
    return sslkit_value


def check_pair(owner: str, z_a: Tensor, z_b: Tensor) -> None:
    """``z_a`` and ``z_b``, the two views' outputs, must have the same shape."""
    if z_a.shape != z_b.shape:
        raise ArgumentError(f"{owner} needs both views' outputs of one shape, got {tuple(z_a.shape)} and "
                        f"{tuple(z_b.shape)}: pass the same samples' projections of the two views")
