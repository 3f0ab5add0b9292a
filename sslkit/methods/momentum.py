"""Methods with a momentum (EMA) target network: BYOL, MoCo v3 and DINO."""

from __future__ import annotations

from typing import Optional

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sslkit.config import Config
from sslkit.losses import DINOLoss, MoCoV3Loss, NegativeCosineLoss, teacher_temperature
from sslkit.methods.base import METHODS, Method
from sslkit.models import DINOHead, MomentumEncoder, cosine_momentum, mlp_head


class MomentumMethod(Method):
    """A student (backbone + ``projection_head``) and its EMA copy, the teacher.

    After each optimiser step the teacher moves towards the student with a momentum that
    rises from ``method.momentum_base`` to ``momentum_end`` on a cosine over the run.
    """

    projection_head: nn.Module
    teacher: MomentumEncoder

    def student(self) -> nn.Sequential:
        """The online network the teacher copies (built on the fly: registering it would
        store every weight twice in checkpoints)."""
        return nn.Sequential(self.backbone, self.projection_head)

    def momentum(self) -> float:
        m = self.cfg.method
        return cosine_momentum(self.step, self.total_steps, m.momentum_base, m.momentum_end)

    def compile_targets(self) -> list[nn.Module]:
        return [self.backbone, self.teacher.module[0]]

    def after_optimizer_step(self, applied: torch.Tensor) -> None:
        self.teacher.update(self.student(), self.momentum(), applied)


class PredictorMethod(MomentumMethod):
    """BYOL and MoCo v3: the student's projection passes through a predictor and is compared
    with the teacher's projection of the other view, symmetrised over the two views."""

    prediction_head: nn.Module
    criterion: nn.Module

    def ssl_step(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x0, x1 = views  # (B, 3, h, w) each
        x = torch.cat([x0, x1])
        h = self.backbone(x)  # (2B, F)
        p0, p1 = self.prediction_head(self.projection_head(h)).chunk(2)  # (B, D) each
        t0, t1 = self.teacher(x).chunk(2)  # (B, D) each, no gradient
        return self.pair_loss(p0, t1) + self.pair_loss(p1, t0), h[: len(x0)]

    def pair_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.criterion(prediction, target)


@METHODS.register("byol")
class BYOL(PredictorMethod):
    """Grill et al. 2020, https://arxiv.org/abs/2006.07733: MLP projector and predictor
    (4096 -> 256), negative cosine similarity, symmetrised and averaged."""

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        m = cfg.method
        self.projection_head = mlp_head(
            self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim, m.proj_layers, m.proj_batch_norm
        )
        self.prediction_head = mlp_head(
            m.proj_output_dim, m.pred_hidden_dim, m.proj_output_dim, m.pred_layers, m.proj_batch_norm
        )
        self.teacher = MomentumEncoder(self.student())
        self.criterion = NegativeCosineLoss()

    def pair_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.criterion(prediction, target)


@METHODS.register("mocov3")
class MoCoV3(PredictorMethod):
    """Chen, Xie and He 2021, https://arxiv.org/abs/2104.02057: a 3-layer projector ending in
    BatchNorm without affine, a 2-layer predictor, InfoNCE against the teacher's keys of the
    global batch (``method.temperature``)."""

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        m = cfg.method
        self.projection_head = mlp_head(
            self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim, m.proj_layers, m.proj_batch_norm,
            last_batch_norm=True,
        )
        self.prediction_head = mlp_head(
            m.proj_output_dim, m.pred_hidden_dim, m.proj_output_dim, m.pred_layers, m.proj_batch_norm
        )
        self.teacher = MomentumEncoder(self.student())
        self.criterion = MoCoV3Loss(m.temperature, m.gather_distributed)


@METHODS.register("dino")
class DINO(MomentumMethod):
    """Caron et al. 2021, https://arxiv.org/abs/2104.14294: self-distillation from an EMA
    teacher that sees the two global views to a student that sees every view (multi-crop),
    a centred and sharpened teacher, and a DINO head. k-NN evaluates the teacher's backbone,
    as the paper does."""

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        m = cfg.method
        if (cfg.augment.local_crops and isinstance(self.backbone, VisionTransformer)
                and not self.backbone.dynamic_img_size):
            raise ValueError(
                "dino with local crops of another size needs a ViT that accepts several image sizes: "
                "set model.timm_kwargs.dynamic_img_size=true"
            )
        self.projection_head = DINOHead(
            self.backbone.num_features, m.proj_hidden_dim, m.bottleneck_dim, m.proj_output_dim, m.proj_layers,
            m.proj_batch_norm, m.norm_last_layer,
        )
        self.teacher = MomentumEncoder(self.student())
        self.criterion = DINOLoss(m.proj_output_dim, m.student_temp, m.center_momentum)

    def ssl_step(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.cfg.method
        batch = len(views[0])
        global_views = torch.cat(views[:2])  # (2B, 3, S, S)
        teacher_out = list(self.teacher(global_views).chunk(2))  # 2 x (B, K), no gradient
        h = self.backbone(global_views)  # (2B, F)
        student_out = list(self.projection_head(h).chunk(2))
        if len(views) > 2:  # the local views share one smaller size: one more pass
            local = self.projection_head(self.backbone(torch.cat(views[2:])))  # (N_local * B, K)
            student_out += list(local.chunk(len(views) - 2))
        temp = teacher_temperature(self.epoch, m.teacher_temp, m.warmup_teacher_temp, m.warmup_teacher_temp_epochs)
        return self.criterion(teacher_out, student_out, temp), h[:batch]

    def before_optimizer_step(self) -> None:
        if self.epoch < self.cfg.method.freeze_last_layer_epochs:
            for p in self.projection_head.last_layer.parameters():
                p.grad = None

    def feature_model(self) -> nn.Module:
        return self.teacher.module[0]
