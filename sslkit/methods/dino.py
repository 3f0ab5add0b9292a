"""DINO: Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
https://arxiv.org/abs/2104.14294 (official code: facebookresearch/dino, ``main_dino.py``)."""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

import torch
from pydantic import Field
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from sslkit.config import Config, Count, NonNegative, Positive, Probability
from sslkit.errors import UserError
from sslkit.losses import DINOLoss, teacher_temperature
from sslkit.methods.base import METHODS, LossTerms
from sslkit.methods.momentum import MomentumConfig, MomentumMethod
from sslkit.models import DINOHead
from sslkit.schedules import Schedules, tabulate


class DINOConfig(MomentumConfig):
    """Defaults: ``main_dino.py``'s: a 3-layer head 2048 -> 256 (bottleneck) -> 65536 prototypes
    without BatchNorm, the last layer weight-normalised and frozen for the first epoch, teacher
    temperature 0.04 (no warm-up), student 0.1, centre momentum 0.9, EMA momentum 0.996 -> 1,
    multi-crop. ``center_mode: sinkhorn_knopp`` replaces the centre with DINOv2's Sinkhorn-Knopp
    centring of the teacher."""

    preset: ClassVar[str] = "multicrop"
    name: str = "dino"
    proj_hidden_dim: Count = 2048
    bottleneck_dim: Count = 256  # the head's last hidden width before its weight-normalised layer
    proj_output_dim: Count = 65536  # prototypes
    proj_layers: Count = 3
    proj_batch_norm: bool = False  # main_dino.py's use_bn_in_head
    norm_last_layer: bool = True  # fix the weight norm of the head's last layer to 1
    freeze_last_layer_epochs: NonNegative = 1.0  # no updates to the head's last layer for this long
    teacher_temp: Positive = 0.04
    warmup_teacher_temp: Positive = 0.04
    warmup_teacher_temp_epochs: NonNegative = 0.0  # linear from warmup_teacher_temp to teacher_temp
    student_temp: Positive = 0.1
    center_momentum: float = Field(0.9, ge=0, lt=1)
    center_mode: Literal["mean", "sinkhorn_knopp"] = "mean"  # the teacher's centre | DINOv2's Sinkhorn-Knopp
    momentum_base: Probability = 0.996


@METHODS.register("dino", config=DINOConfig)
class DINO(MomentumMethod):
    """Self-distillation from an EMA teacher that sees the two global views to a student that
    sees every view (multi-crop), a centred and sharpened teacher, and a DINO head. k-NN
    evaluates the teacher's backbone, as the paper does. Loss term: ``dino``. Schedules:
    ``momentum``, ``teacher_temp``, ``freeze_last_layer`` (1 while the last layer is frozen)."""

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        if (getattr(cfg.augment, "local_crops", 0) and isinstance(self.backbone, VisionTransformer)
                and not self.backbone.dynamic_img_size):
            raise UserError(
                "dino with local crops of another size needs a ViT that accepts several image sizes: "
                "set model.timm_kwargs.dynamic_img_size=true"
            )
        m = self.config
        self.criterion = DINOLoss(m.proj_output_dim, student_temp=m.student_temp, center_momentum=m.center_momentum,
                                  center_mode=m.center_mode)

    def make_head(self) -> nn.Module:
        m = self.config
        return DINOHead(self.backbone.num_features, m.proj_hidden_dim, m.bottleneck_dim, m.proj_output_dim,
                        m.proj_layers, m.proj_batch_norm, m.norm_last_layer)

    def schedules(self, steps_per_epoch: int, total_steps: int) -> Schedules:
        m = self.config
        return {
            **super().schedules(steps_per_epoch, total_steps),
            "teacher_temp": tabulate(lambda s: teacher_temperature(
                s / steps_per_epoch, m.teacher_temp, m.warmup_teacher_temp, m.warmup_teacher_temp_epochs), total_steps),
            "freeze_last_layer": tabulate(lambda s: float(s / steps_per_epoch < m.freeze_last_layer_epochs),
                                          total_steps),
        }

    def ssl_step(self, views: list[Tensor]) -> tuple[LossTerms, Tensor]:
        batch = len(views[0])
        global_views = torch.cat(views[:2])  # (2B, 3, S, S)
        teacher_out = list(self.teacher(global_views).chunk(2))  # 2 x (B, K), no gradient
        h = self.backbone(global_views)  # (2B, F)
        student_out = list(self.projection_head(h).chunk(2))
        if len(views) > 2:  # the local views share one smaller size: one more pass
            local = self.projection_head(self.backbone(torch.cat(views[2:])))  # (N_local * B, K)
            student_out += list(local.chunk(len(views) - 2))
        return {"dino": self.criterion(teacher_out, student_out, self.scheduled["teacher_temp"])}, h[:batch]

    def before_optimizer_step(self) -> None:
        if self.scheduled["freeze_last_layer"]:
            for p in self.projection_head.last_layer.parameters():
                p.grad = None

    def feature_model(self) -> nn.Module:
        return self.teacher.module[0]

    def feature_projection(self) -> Optional[nn.Module]:
        return self.teacher.module[1]
