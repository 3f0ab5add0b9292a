"""iBOT: Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer",
https://arxiv.org/abs/2111.07832 (official code: bytedance/ibot, ``main_ibot.py``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from sslkit.config import Config, Count, FractionRange, NonNegative, Positive, PositiveRange, Probability
from sslkit.losses import IBOTPatchLoss
from sslkit.methods.base import METHODS, LossTerms
from sslkit.methods.dino import DINO, DINOConfig
from sslkit.models import DINOHead, block_mask, block_mask_bound, encode_masked, select_true
from sslkit.models.masking import check_vit


class IBOTConfig(DINOConfig):
    """Defaults: the official ViT-S/16 run (README: ``--shared_head true --out_dim 8192
    --norm_last_layer false --teacher_temp 0.07 --warmup_teacher_temp_epochs 30 --pred_ratio 0
    0.3 --pred_ratio_var 0 0.2``): one head for the class token and the patches, 8192
    prototypes, half the global views masked, each with a ratio in [0.1, 0.5]; the block
    masks are dinov2's (rectangles of at least 4 patches, aspect 0.3-3.3). Teacher
    temperature 0.04 -> 0.07 over 30 epochs for both losses (iBOT's patch temperature is a key
    of its own, 0.07 in that run)."""

    name: str = "ibot"
    proj_output_dim: Count = 8192  # class-token prototypes (out_dim)
    patch_output_dim: Count = 8192  # patch prototypes of a separate head (patch_out_dim)
    shared_head: bool = True  # one head for the class token and the patches
    norm_last_layer: bool = False
    teacher_temp: Positive = 0.07
    warmup_teacher_temp_epochs: NonNegative = 30.0
    mask_probability: Probability = 0.5  # the share of global views that get masks
    mask_ratio: FractionRange = (0.1, 0.5)  # a masked view's share of masked patches
    min_block_patches: Count = 4  # the smallest masked rectangle
    block_aspect: PositiveRange = (0.3, 1 / 0.3)  # its height / width (log-uniform)
    dino_loss_weight: NonNegative = 1.0  # the class-token loss's weight (iBOT's lambda1)
    ibot_loss_weight: NonNegative = 1.0  # the patch loss's weight (lambda2)


class IBOTHeads(nn.Module):
    """The class-token head (``dino``) and, unless shared, the patch head (``patch``)."""

    def __init__(self, dino: DINOHead, patch: Optional[DINOHead]) -> None:
        super().__init__()
        self.dino = dino
        self.patch = patch

    def patch_head(self) -> DINOHead:
        return self.dino if self.patch is None else self.patch

    def last_layers(self) -> list[nn.Module]:
        return [self.dino.last_layer] + ([] if self.patch is None else [self.patch.last_layer])


@METHODS.register("ibot", config=IBOTConfig)
class IBOT(DINO):
    """DINO's class-token self-distillation plus masked image modelling: the student sees the
    two global views with block-wise masks (masked patches replaced by a learned mask token),
    the teacher sees them whole, and the student's masked patch tokens are distilled from the
    teacher's tokens at the same places (``IBOTPatchLoss``). Local views go to the class-token
    loss only. Loss terms: ``dino``, ``ibot``. Needs a timm ViT.

    The masked patches are selected with a fixed length (the most the masks can hold), so a
    step needs no host sync; masks are drawn from the engine's generator for the global batch.
    """

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        m = self.config
        vit = check_vit(self.backbone, m.name)
        self.mask_token = nn.Parameter(torch.zeros(vit.embed_dim))  # dinov2's init
        patch_dim = m.proj_output_dim if m.shared_head else m.patch_output_dim
        self.patch_criterion = IBOTPatchLoss(patch_dim, m.teacher_temp, m.student_temp, m.center_mode,
                                             m.center_momentum)

    def make_head(self) -> nn.Module:
        m = self.config
        patch = None if m.shared_head else DINOHead(
            self.backbone.num_features, m.proj_hidden_dim, m.bottleneck_dim, m.patch_output_dim, m.proj_layers,
            m.proj_batch_norm, m.norm_last_layer)
        return IBOTHeads(super().make_head(), patch)

    def feature_projection(self) -> Optional[nn.Module]:
        return self.teacher.module[1].dino  # the class-token head

    def compile_targets(self) -> list[nn.Module]:
        # the ViTs run through encode_masked, not their forward: compile their blocks
        return [self.backbone.blocks, self.teacher.module[0].blocks]

    def class_terms(self, student_global: Tensor, teacher_cls: Tensor, local_views: list[Tensor]) -> LossTerms:
        """The class-token loss (and, in DINOv2, KoLeo): student_global (2B, E) pooled tokens of
        the masked global views, teacher_cls (2B, K) the teacher head's outputs."""
        heads = self.projection_head
        student_out = list(heads.dino(student_global).chunk(2))
        if local_views:  # the local views share one smaller size: one more pass
            local = heads.dino(self.backbone(torch.cat(local_views)))  # (N_local * B, K)
            student_out += list(local.chunk(len(local_views)))
        loss = self.criterion(list(teacher_cls.chunk(2)), student_out, self.scheduled["teacher_temp"])
        return {"dino": self.config.dino_loss_weight * loss}

    def ssl_step(self, views: list[Tensor]) -> tuple[LossTerms, Tensor]:
        m = self.config
        vit = self.backbone
        batch = len(views[0])
        global_views = torch.cat(views[:2])  # (2B, 3, S, S)
        grid = tuple(s // p for s, p in zip(global_views.shape[-2:], vit.patch_embed.patch_size))
        masks = block_mask(batch, grid, m.mask_probability, m.mask_ratio, m.min_block_patches,
                           block_aspect=m.block_aspect, generator=self.generator, device=global_views.device,
                           shard=self.shard, views=2)  # (2B, h, w)
        length = block_mask_bound(batch, grid, m.mask_probability, m.mask_ratio, self.shard[1], views=2)
        index, _ = select_true(masks.flatten(), length)  # (M,) masked patches first, then padding
        prefix = vit.num_prefix_tokens

        tokens = encode_masked(vit, global_views, masks, self.mask_token)  # (2B, prefix + L, E)
        pooled = vit.forward_head(tokens, pre_logits=True)  # (2B, E): the class token, or the ViT's pooling
        student_patch = self.projection_head.patch_head()(tokens[:, prefix:].flatten(0, 1)[index])  # (M, K')
        with torch.no_grad():
            teacher_vit, teacher_heads = self.teacher.module
            t_tokens = encode_masked(teacher_vit, global_views)  # the whole images
            teacher_cls = teacher_heads.dino(teacher_vit.forward_head(t_tokens, pre_logits=True))  # (2B, K)
            teacher_patch = teacher_heads.patch_head()(t_tokens[:, prefix:].flatten(0, 1)[index])  # (M, K')

        terms = self.class_terms(pooled, teacher_cls, views[2:])
        patch = self.patch_criterion(teacher_patch, student_patch, masks, self.scheduled["teacher_temp"], index=index)
        terms["ibot"] = m.ibot_loss_weight * patch
        return terms, pooled[:batch]

    def before_optimizer_step(self) -> None:
        if self.scheduled["freeze_last_layer"]:
            for layer in self.projection_head.last_layers():
                for p in layer.parameters():
                    p.grad = None
