"""MoCo v2: Chen, Fan, Girshick and He 2020, "Improved Baselines with Momentum Contrastive
Learning", https://arxiv.org/abs/2003.04297 (MoCo: He et al. 2020, https://arxiv.org/abs/1911.05722;
official code: facebookresearch/moco, ``main_moco.py`` with ``--mlp --moco-t 0.2 --aug-plus --cos``)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.config import Config, Count, Positive, Probability
from sslkit.methods.base import METHODS, LossTerms
from sslkit.methods.momentum import MomentumConfig, MomentumMethod
from sslkit.models import mlp_head
from sslkit.models.memory_bank import MemoryBank


class MoCoV2Config(MomentumConfig):
    """Defaults: the paper's and ``main_moco.py``'s: a 2-layer head 2048 -> 128 without
    BatchNorm, a queue of 65,536 keys, temperature 0.2, a constant key-encoder momentum 0.999,
    the loss of the query of the first view against the key of the second (``symmetric``: both
    ways, as lightly's CIFAR-10 benchmark and MoCo's CIFAR-10 demo), SimCLR-style views with blur
    (``--aug-plus``). The keys come from every process (the official code's all-gather before
    ``_dequeue_and_enqueue``); BatchNorm over several processes: ``model.sync_batchnorm``."""

    name: str = "mocov2"
    proj_hidden_dim: Count = 2048
    proj_output_dim: Count = 128
    proj_batch_norm: bool = False
    queue_length: Count = 65536
    temperature: Positive = 0.2
    momentum_base: Probability = 0.999
    momentum_end: Probability = 0.999
    symmetric: bool = False


def queue_infonce(query: Tensor, key: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo's InfoNCE: each query's positive is its key, its negatives are the queue's rows.

    The loss of lightly's ``NTXentLoss(temperature, memory_bank_size=(L, D))`` (which also uses
    only the bank as negatives); ``tests/test_methods_more.py`` compares them.

    Shapes: query (N, D), key (N, D) (no gradient), queue (L, D) -> scalar, the mean over N.
    """
    q, k = F.normalize(query, dim=1), F.normalize(key, dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    negative = q @ F.normalize(queue, dim=1).T  # (N, L)
    logits = torch.cat([positive, negative], dim=1) / temperature  # (N, 1 + L)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


@METHODS.register("mocov2", config=MoCoV2Config)
class MoCoV2(MomentumMethod):
    """A query encoder (backbone + head), its momentum copy as key encoder, and a queue of keys
    (``sslkit.models.MemoryBank``, filled from every process, saved in checkpoints) as the
    negatives. Loss term: ``mocov2``. Schedules: ``momentum``."""

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        m = self.config
        self.queue = MemoryBank(m.queue_length, m.proj_output_dim, gather_distributed=True)

    def make_head(self) -> nn.Module:
        m = self.config
        return mlp_head(self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim, m.proj_layers,
                        m.proj_batch_norm)

    def ssl_step(self, views: list[Tensor]) -> tuple[LossTerms, Tensor]:
        x0, x1 = views  # (B, 3, h, w) each
        queries = torch.cat([x0, x1]) if self.config.symmetric else x0
        keys = torch.cat([x1, x0]) if self.config.symmetric else x1
        h = self.backbone(queries)  # (B or 2B, F)
        q = self.projection_head(h)  # (B or 2B, D)
        k = F.normalize(self.teacher(keys), dim=1)  # (B or 2B, D), no gradient
        negatives = self.queue.features.clone()  # (L, D): the queue before this batch joins it
        loss = queue_infonce(q, k, negatives, self.config.temperature)
        for view_keys in k.chunk(2 if self.config.symmetric else 1):  # view by view: the queue's
            self.queue.enqueue(view_keys)  # rows in the same order however the batch is split
        return {"mocov2": loss}, h[: len(x0)]
