"""MoCo v2: Chen, Fan, Girshick and He 2020, "Improved Baselines with Momentum Contrastive
Learning", https://arxiv.org/abs/2003.04297 (MoCo: He et al. 2020, https://arxiv.org/abs/1911.05722;
official code: facebookresearch/moco, ``main_moco.py`` with ``--mlp --moco-t 0.2 --aug-plus --cos``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from sslkit.config import Config, Count, Positive, Probability
from sslkit.losses import NTXentLoss
from sslkit.methods.base import METHODS, LossTerms
from sslkit.methods.momentum import MomentumConfig, MomentumMethod
from sslkit.models import mlp_head


class MoCoV2Config(MomentumConfig):
    """Defaults: the paper's and ``main_moco.py``'s: a 2-layer head 2048 -> 128 without
    BatchNorm, a queue of 65,536 keys, temperature 0.2, a constant key-encoder momentum 0.999,
    the loss of the first view's query against the second view's key (``symmetric``: both ways,
    as lightly's CIFAR-10 benchmark), SimCLR-style views with blur (``--aug-plus``). The keys
    come from every process (the official code's all-gather before ``_dequeue_and_enqueue``);
    BatchNorm over several processes: ``model.sync_batchnorm`` (the official code shuffles the
    key encoder's batch across GPUs instead)."""

    name: str = "mocov2"
    proj_hidden_dim: Count = 2048
    proj_output_dim: Count = 128
    proj_batch_norm: bool = False
    queue_length: Count = 65536
    temperature: Positive = 0.2
    momentum_base: Probability = 0.999
    momentum_end: Probability = 0.999
    symmetric: bool = False


@METHODS.register("mocov2", config=MoCoV2Config)
class MoCoV2(MomentumMethod):
    """A query encoder (backbone + head), its momentum copy as key encoder, and a queue of keys
    as the negatives: ``NTXentLoss`` with a memory bank (lightly's ``NTXentLoss(memory_bank_size)``,
    the queue an ``sslkit.models.MemoryBank`` filled from every process and saved in checkpoints,
    at ``criterion.memory_bank``). Each call enqueues its keys after using the queue; symmetric,
    the second direction's queue holds the first's keys, as in lightly's benchmark. Loss term:
    ``mocov2``. Schedules: ``momentum``."""

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        m = self.config
        self.criterion = NTXentLoss(temperature=m.temperature, memory_bank_size=(m.queue_length, m.proj_output_dim),
                                    gather_distributed=True)

    def make_head(self) -> nn.Module:
        m = self.config
        return mlp_head(self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim, m.proj_layers,
                        m.proj_batch_norm)

    def ssl_step(self, views: list[Tensor]) -> tuple[LossTerms, Tensor]:
        x0, x1 = views  # (B, 3, h, w) each
        if not self.config.symmetric:
            h = self.backbone(x0)  # (B, F)
            return {"mocov2": self.criterion(self.projection_head(h), self.teacher(x1))}, h
        h = self.backbone(torch.cat([x0, x1]))  # (2B, F): one pass
        q0, q1 = self.projection_head(h).chunk(2)  # (B, D) each
        k1, k0 = self.teacher(torch.cat([x1, x0])).chunk(2)  # (B, D) each, no gradient
        return {"mocov2": 0.5 * (self.criterion(q0, k1) + self.criterion(q1, k0))}, h[: len(x0)]
