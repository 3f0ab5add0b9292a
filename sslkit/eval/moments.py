"""Moment probing: a linear head on first- and second-order statistics of the last feature map.

Gao et al., "Tuning Pre-trained Model via Moment Probing" (ICCV 2023, arXiv 2307.11342): a
linear probe sees only the average of the final tokens (or feature-map positions); how the
features vary across positions carries more, and a linear head on the mean and the
second-order moments reads it at little cost. MP computes the second-order part with a
multi-head cross-covariance (MHC3) learned with the head; here, so that the features can be
cached and probed as ``eval linear``'s are, the second-order part is fixed:

- ``diag``: the per-channel variance over positions, (B, C);
- ``lowrank``: the positions' features projected to r dimensions by a fixed random Gaussian
  projection (seed 0, scaled by 1 / sqrt(C); random projections keep inner products on average,
  Johnson-Lindenstrauss), then the upper triangle, diagonal included, of the r x r covariance
  over positions, (B, r (r + 1) / 2).

Each is concatenated with the mean over positions, (B, C), and probed by
:func:`~sslkit.eval.linear.train_linear_probes`, which standardises every dimension first. The
plain linear probe on the network's own output is reported beside, from the same pass. Positions:
a CNN's h x w map; a ViT's patch tokens (class and register tokens left out) after its final norm.
"""

from __future__ import annotations

import argparse
import math
from typing import Sequence

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from sslkit.config import Config
from sslkit.errors import UserError
from sslkit.eval.clean import clean_features
from sslkit.eval.linear import DEFAULT_EPOCHS, DEFAULT_LRS, train_linear_probes
from sslkit.eval.protocols import register_protocol

KINDS = ("diag", "lowrank")


def positions(fmap: Tensor, prefix: int = 0) -> Tensor:
    """(B, C, H, W) feature map or (B, T, C) tokens -> (B, P, C) features at P positions."""
    if fmap.ndim == 4:
        return fmap.flatten(2).transpose(1, 2)
    if fmap.ndim == 3:
        return fmap[:, prefix:]
    raise UserError(f"moment probing needs a feature map or tokens, the backbone gives shape {tuple(fmap.shape)}")


def moment_features(x: Tensor, kind: str, projection: Tensor | None = None) -> Tensor:
    """Mean and second-order statistics of (B, P, C) position features (module docstring).

    Args:
        x: (B, P, C) features at P positions.
        kind: ``diag`` or ``lowrank``.
        projection: (C, r) fixed projection for ``lowrank``.

    Returns:
        (B, C + C) for ``diag``, (B, C + r (r + 1) / 2) for ``lowrank``.
    """
    x = x.float()
    mean = x.mean(dim=1)  # (B, C)
    if kind == "diag":
        return torch.cat([mean, x.var(dim=1, unbiased=False)], dim=1)
    if kind == "lowrank":
        y = x @ projection  # (B, P, r)
        y = y - y.mean(dim=1, keepdim=True)
        cov = y.transpose(1, 2) @ y / y.shape[1]  # (B, r, r)
        rows, cols = torch.triu_indices(cov.shape[1], cov.shape[2], device=cov.device)
        return torch.cat([mean, cov[:, rows, cols]], dim=1)
    raise UserError(f"unknown moment kind '{kind}'; known: {', '.join(KINDS)}")


def random_projection(channels: int, rank: int) -> Tensor:
    """(C, r) Gaussian projection from seed 0, scaled by 1 / sqrt(C): the same for every run."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(channels, rank, generator=generator) / math.sqrt(channels)


class MomentTaps(nn.Module):
    """Wraps a feature network with timm's ``forward_features``/``forward_head``: ``forward``
    returns the network's own output and each kind's moment features, concatenated; ``dims``
    (set by the first forward) splits them, in the order ``["output", *kinds]``."""

    def __init__(self, model: nn.Module, kinds: Sequence[str], rank: int) -> None:
        super().__init__()
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise UserError(f"moment probing needs the backbone's unpooled features (timm's forward_features); "
                            f"{type(model).__name__} has none: use a timm model or tiny_cnn")
        self.model = model
        self.kinds = list(kinds)
        self.rank = rank
        self.projection: Tensor | None = None  # (C, r), drawn once C is known (first batch)
        self.prefix = getattr(model, "num_prefix_tokens", 0)
        self.dims: list[int] = []

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, sum of dims)
        fmap = self.model.forward_features(x)  # (B, C, h, w) or (B, T, C)
        out = self.model.forward_head(fmap, pre_logits=True).flatten(1)  # (B, D): what `eval linear` probes
        pos = positions(fmap, self.prefix)  # (B, P, C)
        if "lowrank" in self.kinds and self.projection is None:
            self.projection = random_projection(pos.shape[2], self.rank).to(pos.device)
        parts = [out.float()] + [moment_features(pos, kind, self.projection) for kind in self.kinds]
        self.dims = [p.shape[1] for p in parts]
        return torch.cat(parts, dim=1)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", dest="kinds", nargs="+", choices=KINDS, default=list(KINDS),
                   help="diag: mean + per-channel variance; lowrank: mean + covariance of r random projections")
    p.add_argument("--rank", type=int, default=32, help="r of the low-rank covariance")
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="one head per learning rate")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)


@register_protocol(
    "moments", "moment probing (mean + second-order statistics of the last feature map) beside plain linear",
    summary=lambda r: "  ".join(f"{name} {x['top1']:.4f}" for name, x in r["probes"].items()) + "  (top-1)",
    headline=lambda r: {f"moments {name}" if name != "linear" else "linear": x["top1"]
                        for name, x in r["probes"].items()},
    arguments=_arguments,
)
def moments_protocol(
    cfg: Config, model: nn.Module, accelerator: Accelerator, kinds: Sequence[str] = KINDS, rank: int = 32,
    lrs: Sequence[float] = DEFAULT_LRS, epochs: int = DEFAULT_EPOCHS,
) -> dict:
    """Plain linear and moment probes from one pass (module docstring).

    Returns:
        ``{"rank", "probes": {"linear" | kind: {"dim", "top1", "top5", "best_lr"}}}``.
    """
    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    taps = MomentTaps(model, kinds, rank)
    f = clean_features(cfg, taps, accelerator)  # every layer's columns side by side, one pass
    train_l, test_l, classes = f.train_labels, f.test_labels, f.num_classes
    probes = {}
    for name, a, b in zip(["linear", *taps.kinds], f.train.split(taps.dims, 1), f.test.split(taps.dims, 1)):
        r = train_linear_probes(a, train_l, b, test_l, classes, lrs=lrs, epochs=epochs)
        probes[name] = {"dim": a.shape[1], "top1": r["top1"], "top5": r["top5"], "best_lr": r["best_lr"]}
    return {"rank": rank, "probes": probes}
