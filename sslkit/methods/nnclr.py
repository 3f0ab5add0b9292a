"""NNCLR: Dwibedi et al. 2021, "With a Little Help from My Friends: Nearest-Neighbor Contrastive
Learning of Visual Representations", https://arxiv.org/abs/2104.14548."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.config import Config, Count, Positive
from sslkit.losses import NTXentLoss
from sslkit.methods.base import METHODS, LossTerms
from sslkit.methods.two_view import ProjectionConfig, TwoViewMethod
from sslkit.models import MemoryBank, mlp_head


class NNCLRConfig(ProjectionConfig):
    """Defaults: the paper (section 4.1): a 3-layer projector 2048 -> 256 and a 2-layer predictor
    256 -> 4096 -> 256, both with BatchNorm, a support set of 98,304 projections, temperature
    0.1, BYOL's augmentations. The support set is filled from every process."""

    preset: ClassVar[str] = "byol"
    name: str = "nnclr"
    proj_hidden_dim: Count = 2048
    proj_output_dim: Count = 256
    proj_layers: Count = 3
    pred_hidden_dim: Count = 4096
    support_set_size: Count = 98304
    temperature: Positive = 0.1
    gather_distributed: bool = True  # negatives of the global batch, and the support set's rows


@torch.no_grad()
def nearest_neighbours(x: Tensor, support: Tensor) -> Tensor:
    """Each row's nearest neighbour (cosine similarity) among the rows of ``support``, as it is
    stored (lightly's ``NNMemoryBankModule``). No gradient.

    Shapes: x (N, D), support (L, D) -> (N, D).
    """
    similarity = F.normalize(x, dim=1) @ F.normalize(support, dim=1).T  # (N, L)
    return support.index_select(0, similarity.argmax(dim=1))


@METHODS.register("nnclr", config=NNCLRConfig)
class NNCLR(TwoViewMethod):
    """NT-Xent between each view's nearest neighbour in the support set and the other view's
    prediction, symmetrised; the support set (an ``sslkit.models.MemoryBank`` of projections,
    filled from every process, saved in checkpoints) takes the second view's projections after
    each step, as lightly's NNCLR. Loss term: ``nnclr``."""

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        m = self.config
        self.prediction_head = mlp_head(m.proj_output_dim, m.pred_hidden_dim, m.proj_output_dim, 2, m.proj_batch_norm)
        self.support_set = MemoryBank(m.support_set_size, m.proj_output_dim, gather_distributed=m.gather_distributed)
        self.criterion = NTXentLoss(temperature=m.temperature, gather_distributed=m.gather_distributed)

    def make_head(self) -> nn.Module:
        m = self.config
        return mlp_head(self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim, m.proj_layers,
                        m.proj_batch_norm, last_batch_norm=True)

    def loss_terms(self, z0: Tensor, z1: Tensor) -> LossTerms:
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)  # (B, D) each
        support = self.support_set.bank  # (L, D): before this batch joins it
        nn0, nn1 = nearest_neighbours(z0.detach(), support), nearest_neighbours(z1.detach(), support)
        self.support_set.enqueue(z1.detach())
        return {"nnclr": 0.5 * (self.criterion(nn0, p1) + self.criterion(nn1, p0))}
