"""DINOv2: Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision",
https://arxiv.org/abs/2304.07193 (official code: facebookresearch/dinov2,
``dinov2/train/ssl_meta_arch.py``, ``dinov2/configs/ssl_default_config.yaml``)."""

from __future__ import annotations

from typing import Literal, Optional

from torch import Tensor

from sslkit.config import Config, Count, NonNegative, Probability
from sslkit.losses import KoLeoLoss
from sslkit.methods.base import METHODS, LossTerms
from sslkit.methods.ibot import IBOT, IBOTConfig


class DINOv2Config(IBOTConfig):
    """Defaults: ``ssl_default_config.yaml`` and the paper: separate DINO and iBOT heads of
    2048 -> 256 -> 65536 prototypes (the paper unties them; the large configs set
    ``ibot.separate_head: true``), the last layers' norms learned, Sinkhorn-Knopp centring
    (the paper; ``train.centering: sinkhorn_knopp`` in the large configs), teacher temperature
    0.04 -> 0.07 over 30 epochs, EMA momentum 0.992 -> 1, half the global views masked with
    ratios in [0.1, 0.5], KoLeo weight 0.1 on the student's class tokens of each global view."""

    name: str = "dinov2"
    proj_output_dim: Count = 65536
    patch_output_dim: Count = 65536
    shared_head: bool = False
    center_mode: Literal["mean", "sinkhorn_knopp"] = "sinkhorn_knopp"
    momentum_base: Probability = 0.992
    koleo_loss_weight: NonNegative = 0.1
    koleo_gather_distributed: bool = False  # neighbours among every process's rows (dinov2: this process's)


@METHODS.register("dinov2", config=DINOv2Config)
class DINOv2(IBOT):
    """iBOT (class-token and masked-patch self-distillation from an EMA teacher) plus the
    KoLeo regulariser on the student's backbone features of each global view, with
    Sinkhorn-Knopp centring of the teacher by default. Loss terms: ``dino``, ``ibot``,
    ``koleo``. A ViT with register tokens: ``model.timm_kwargs.reg_tokens: 4``."""

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        self.koleo = KoLeoLoss(gather_distributed=self.config.koleo_gather_distributed)

    def class_terms(self, student_global: Tensor, teacher_cls: Tensor, local_views: list[Tensor]) -> LossTerms:
        terms = super().class_terms(student_global, teacher_cls, local_views)
        koleo = sum(self.koleo(view) for view in student_global.chunk(2))  # per global view, as dinov2
        terms["koleo"] = self.config.koleo_loss_weight * koleo
        return terms
