"""Methods with a momentum (EMA) teacher: the base of BYOL, MoCo v3 and DINO."""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field
from torch import Tensor, nn

from sslkit.config import Config, Count, ModelConfig, Probability
from sslkit.methods.base import LossTerms, Method
from sslkit.methods.two_view import ProjectionConfig
from sslkit.models import MomentumEncoder, create_backbone, mlp_head
from sslkit.schedules import Schedules, cosine, tabulate


class MomentumConfig(ProjectionConfig):
    """A student (backbone + projection head) and its EMA teacher."""

    momentum_base: Probability = 0.996  # the teacher's EMA momentum at the first step ...
    momentum_end: Probability = 1.0  # ... rising on a cosine to this at the last (BYOL, DINO)
    # The teacher is built from its own config: the student's model without stochastic depth
    # (DINO's teacher has none); this is the teacher's drop_path_rate where the model takes one.
    teacher_drop_path_rate: float = Field(0.0, ge=0, lt=1)


def teacher_model(model: ModelConfig, drop_path_rate: float) -> ModelConfig:
    """The student's model config with the teacher's ``drop_path_rate`` (set only where the
    student's ``timm_kwargs`` set one, so that models without the keyword are built alike)."""
    if "drop_path_rate" not in model.timm_kwargs:
        return model
    return model.model_copy(update={"timm_kwargs": {**model.timm_kwargs, "drop_path_rate": drop_path_rate}})


class MomentumMethod(Method):
    """A student (``backbone`` + ``projection_head``) and a teacher of the same architecture
    built from its own config (``teacher_model``), started from the student's weights. After
    each optimiser step the teacher moves towards the student with the ``momentum`` schedule.
    """

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        self.projection_head = self.make_head()
        # The teacher's own initialisation is overwritten by the student's weights: drawing it
        # from a forked RNG leaves every later module's initial weights as they would be without it.
        with torch.random.fork_rng(devices=[]):
            model = teacher_model(cfg.model, self.config.teacher_drop_path_rate)
            teacher = nn.Sequential(create_backbone(model), self.make_head())
        self.teacher = MomentumEncoder(teacher, source=self.student())

    def make_head(self) -> nn.Module:
        raise NotImplementedError

    def student(self) -> nn.Sequential:
        """The online network the teacher follows (built on the fly: registering it would store
        every weight twice in checkpoints)."""
        return nn.Sequential(self.backbone, self.projection_head)

    def schedules(self, steps_per_epoch: int, total_steps: int) -> Schedules:
        m = self.config
        return {"momentum": tabulate(lambda s: cosine(s, total_steps, m.momentum_base, m.momentum_end), total_steps)}

    def compile_targets(self) -> list[nn.Module]:
        return [self.backbone, self.teacher.module[0]]

    def after_optimizer_step(self, applied: Tensor) -> None:
        self.teacher.update(self.student(), self.scheduled["momentum"], applied)


class PredictorConfig(MomentumConfig):
    """A predictor MLP on the student's projection (BYOL, MoCo v3)."""

    pred_hidden_dim: Count = 4096
    pred_layers: Count = 2


class PredictorMethod(MomentumMethod):
    """BYOL and MoCo v3: the student's projection passes through a predictor and is compared
    with the teacher's projection of the other view, symmetrised over the two views."""

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        m = self.config
        self.prediction_head = mlp_head(m.proj_output_dim, m.pred_hidden_dim, m.proj_output_dim, m.pred_layers,
                                        m.proj_batch_norm)

    def pair_loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        """prediction, target: (B, D) -> scalar."""
        raise NotImplementedError

    def ssl_step(self, views: list[Tensor]) -> tuple[LossTerms, Tensor]:
        x0, x1 = views  # (B, 3, h, w) each
        x = torch.cat([x0, x1])
        h = self.backbone(x)  # (2B, F)
        p0, p1 = self.prediction_head(self.projection_head(h)).chunk(2)  # (B, D) each
        t0, t1 = self.teacher(x).chunk(2)  # (B, D) each, no gradient
        return {self.config.name: self.pair_loss(p0, t1) + self.pair_loss(p1, t0)}, h[: len(x0)]
