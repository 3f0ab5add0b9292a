"""Projection and prediction heads: MLPs of lightly's ``ProjectionHead`` blocks, and DINO's head."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import ProjectionHead
from torch import nn


def mlp_head(
    input_dim: int,
    hidden_dim: int,
    output_dim: int,
    layers: int = 2,
    batch_norm: bool = True,
    last_batch_norm: bool = False,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> ProjectionHead:
    """``layers`` linear layers, with BatchNorm (optional) and ``activation`` between them.

    The heads of the methods' papers, by arguments:
    BYOL projector and predictor: ``(d, 4096, 256, 2)``; Barlow Twins and VICReg projectors:
    ``(d, 8192, 8192, 3)``; MoCo v3 projector ``(d, 4096, 256, 3, last_batch_norm=True)`` (the
    last BatchNorm has no affine), predictor ``(256, 4096, 256, 2)``.

    Shapes: (B, input_dim) -> (B, output_dim).
    """
    if layers < 1:
        raise ValueError(f"a head needs at least one layer, got layers={layers}")
    dims = [input_dim] + [hidden_dim] * (layers - 1) + [output_dim]
    blocks = [(d_in, d_out, nn.BatchNorm1d(d_out) if batch_norm else None, activation())
              for d_in, d_out in zip(dims[:-2], dims[1:-1])]
    last_norm = nn.BatchNorm1d(output_dim, affine=False) if batch_norm and last_batch_norm else None
    blocks.append((dims[-2], output_dim, last_norm, None))
    return ProjectionHead(blocks)


class DINOHead(nn.Module):
    """DINO's head: an MLP to a bottleneck, L2 normalisation, and a weight-normalised linear
    layer to ``output_dim`` prototypes (Caron et al. 2021, https://arxiv.org/abs/2104.14294).

    The same architecture as lightly's ``DINOProjectionHead``, written with
    ``torch.nn.utils.parametrizations.weight_norm``: lightly's uses the deprecated
    ``nn.utils.weight_norm``, whose module cannot be deep-copied once it has run a forward
    pass, and the EMA teacher is a deep copy of the student.

    Args:
        input_dim: the backbone's feature width.
        hidden_dim: the MLP's width (DINO: 2048).
        bottleneck_dim: the width before the last layer (DINO: 256).
        output_dim: the number of prototypes K (DINO: 65536).
        layers: linear layers before the last one (DINO: 3).
        batch_norm: BatchNorm in the MLP (DINO uses it with ResNets, not with ViTs).
        norm_last_layer: fix the norm of each prototype to 1 (more stable; DINO's default).

    Shapes: (B, input_dim) -> (B, output_dim) logits.

    Examples:
        >>> import torch
        >>> from sslkit.models import DINOHead
        >>> DINOHead(32, 64, 16, 128)(torch.randn(4, 32)).shape
        torch.Size([4, 128])
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        output_dim: int = 65536,
        layers: int = 3,
        batch_norm: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        self.mlp = mlp_head(input_dim, hidden_dim, bottleneck_dim, layers, batch_norm, activation=nn.GELU)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):  # DINO's init
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        last = nn.Linear(bottleneck_dim, output_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        magnitude = self.last_layer.parametrizations.weight.original0  # (output_dim, 1)
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, input_dim) -> (B, output_dim)
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
