"""SwAV: Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", https://arxiv.org/abs/2006.09882 (official code: facebookresearch/swav,
``main_swav.py``)."""

from __future__ import annotations

import math
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from sslkit.config import Config, Count, NonNegative, Positive
from sslkit.distributed import rank, world_size
from sslkit.errors import UserError
from sslkit.losses import SwAVLoss
from sslkit.methods.base import METHODS, LossTerms, Method
from sslkit.methods.two_view import ProjectionConfig
from sslkit.models import MemoryBank, mlp_head
from sslkit.schedules import Schedules, tabulate


class SwAVConfig(ProjectionConfig):
    """Defaults: ``main_swav.py``'s: a 2-layer head 2048 -> 128 with BatchNorm, 3000 prototypes
    (normalised after every step, frozen for the first epoch: ``freeze_prototypes_niters`` 313
    at batch 4096), temperature 0.1, 3 Sinkhorn iterations with epsilon 0.05 and their sums over
    every process, multi-crop, no queue (``queue_length`` 0; the paper's small-batch runs use
    3840 rows from epoch 15)."""

    preset: ClassVar[str] = "multicrop"
    name: str = "swav"
    proj_hidden_dim: Count = 2048
    proj_output_dim: Count = 128
    prototypes: Count = 3000
    temperature: Positive = 0.1
    sinkhorn_iterations: Count = 3
    sinkhorn_epsilon: Positive = 0.05
    freeze_prototypes_epochs: NonNegative = 1.0  # no updates to the prototypes for this long
    queue_length: int = Field(0, ge=0)  # rows of earlier batches per global crop for the codes; 0: no queue
    queue_start_epochs: NonNegative = 15.0  # start filling the queue here; it is used once full
    gather_distributed: bool = True  # Sinkhorn's sums over every process's rows


@METHODS.register("swav", config=SwAVConfig)
class SwAV(Method):
    """Swapped prediction: each global crop's Sinkhorn codes over the prototypes are the targets
    of every other crop's prototype scores (``SwAVLoss``); features and prototypes are
    L2-normalised. The backbone runs once per crop resolution and the head once on every crop,
    as the official code. Loss term: ``swav``. Schedules: ``freeze_prototypes`` (1 while the
    prototypes are frozen) and, with a queue, ``queue_filling`` and ``queue_in_use``.

    The queue (``queue_length`` rows per global crop, an ``sslkit.models.MemoryBank`` filled
    from every process) is the same on every process; each process appends its share of it
    (``queue_length / world_size`` rows, its rank's) to its own rows for the codes, so that with
    the Sinkhorn sums all-reduced P processes compute the codes of one process over the global
    batch and the whole queue. The official code keeps such a share per GPU.
    """

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        m = self.config
        self.projection_head = mlp_head(self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim,
                                        m.proj_layers, m.proj_batch_norm)
        self.prototypes = nn.Linear(m.proj_output_dim, m.prototypes, bias=False)
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        self.queues = nn.ModuleList(
            [MemoryBank(m.queue_length, m.proj_output_dim, gather_distributed=True) for _ in range(2)]
        ) if m.queue_length else None
        self.criterion = SwAVLoss(temperature=m.temperature, sinkhorn_iterations=m.sinkhorn_iterations,
                                  sinkhorn_epsilon=m.sinkhorn_epsilon, sinkhorn_gather_distributed=m.gather_distributed)

    def schedules(self, steps_per_epoch: int, total_steps: int) -> Schedules:
        m = self.config
        out = {"freeze_prototypes": tabulate(lambda s: float(s / steps_per_epoch < m.freeze_prototypes_epochs),
                                             total_steps)}
        if m.queue_length:
            start = m.queue_start_epochs * steps_per_epoch
            full = start + math.ceil(m.queue_length / self.cfg.train.batch_size)  # steps to fill it
            out["queue_filling"] = tabulate(lambda s: float(s >= start), total_steps)
            out["queue_in_use"] = tabulate(lambda s: float(s >= full), total_steps)
        return out

    def queue_scores(self, z: list[Tensor]) -> Optional[list[Tensor]]:
        """The prototype scores of this process's share of the queue (before this batch joins
        it), then the global crops' projections z (2 x (B, D)) join it; None while it is unused."""
        if self.queues is None or not self.scheduled.get("queue_filling"):
            return None
        share = self.config.queue_length // world_size()
        if share * world_size() != self.config.queue_length:
            raise UserError(f"method.queue_length={self.config.queue_length} must divide among "
                            f"{world_size()} processes: set a multiple of {world_size()}")
        scores = None
        with torch.no_grad():
            if self.scheduled["queue_in_use"]:
                own = slice(rank() * share, (rank() + 1) * share)
                scores = [self.prototypes(queue.bank[own]) for queue in self.queues]  # 2 x (share, K)
            for queue, zi in zip(self.queues, z):
                queue.enqueue(zi.detach())
        return scores

    def ssl_step(self, views: list[Tensor]) -> tuple[LossTerms, Tensor]:
        batch = len(views[0])
        h = self.backbone(torch.cat(views[:2]))  # (2B, F)
        features = [h]
        if len(views) > 2:  # the local views share one smaller size: one more backbone pass
            features.append(self.backbone(torch.cat(views[2:])))  # (N_local * B, F)
        z = F.normalize(self.projection_head(torch.cat(features)), dim=1)  # (V * B, D)
        scores = list(self.prototypes(z).chunk(len(views)))  # V x (B, K)
        queue = self.queue_scores(list(z[: 2 * batch].chunk(2)))
        return {"swav": self.criterion(scores[:2], scores[2:], queue)}, h[:batch]

    def before_optimizer_step(self) -> None:
        if self.scheduled["freeze_prototypes"]:
            self.prototypes.weight.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, applied: Tensor) -> None:
        w = self.prototypes.weight  # (K, D): back on the unit sphere after a step that moved it
        w.lerp_(F.normalize(w, dim=1), applied.to(w.dtype))
