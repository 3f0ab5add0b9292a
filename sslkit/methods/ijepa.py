"""I-JEPA: Assran et al. 2023, "Self-Supervised Learning from Images with a Joint-Embedding
Predictive Architecture", https://arxiv.org/abs/2301.08243 (official code:
facebookresearch/ijepa, ``src/train.py``, ``src/masks/multiblock.py``, ``configs/``)."""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

import torch
import torch.nn.functional as F
from lightly.models import utils as lightly_utils
from torch import Tensor, nn

from sslkit.config import Config, Count, FractionRange, MethodConfig, PositiveRange, Probability
from sslkit.errors import UserError
from sslkit.losses import IJEPALoss
from sslkit.methods.base import METHODS, LossTerms, Method
from sslkit.methods.momentum import teacher_model
from sslkit.models import IJEPAPredictor, MomentumEncoder, create_backbone, encode_masked, encode_visible, ijepa_masks
from sslkit.models.block_masks import ijepa_block_bound, select_true
from sslkit.models.masking import check_vit
from sslkit.schedules import Schedules, tabulate


class IJEPAConfig(MethodConfig):
    """Defaults: the official configs (``configs/in1k_vith14_ep300.yaml``): a predictor 12
    blocks deep and 384 wide, one context block of scale 0.85-1 (square) and 4 target blocks
    of scale 0.15-0.2 and aspect 0.75-1.5, at least 10 context patches, no overlap; EMA
    momentum 0.996 -> 1 linear over training; smooth-L1 on the layer-normalised target
    patches (the official code; the paper writes L2); only random-resized crops."""

    preset: ClassVar[str] = "crop"
    name: str = "ijepa"
    pred_dim: Count = 384  # the predictor's width (pred_emb_dim)
    pred_depth: Count = 12
    pred_heads: Optional[Count] = None  # None: the encoder's number of heads (the official code)
    enc_mask_scale: FractionRange = (0.85, 1.0)
    pred_mask_scale: FractionRange = (0.15, 0.2)
    aspect_ratio: PositiveRange = (0.75, 1.5)  # the target blocks' height / width
    num_targets: Count = 4  # num_pred_masks
    min_keep: Count = 10  # a context block keeps more than this many patches
    allow_overlap: bool = False  # context and targets may share patches
    momentum_base: Probability = 0.996
    momentum_end: Probability = 1.0
    loss: Literal["smooth_l1", "l2"] = "smooth_l1"


@METHODS.register("ijepa", config=IJEPAConfig)
class IJEPA(Method):
    """A context encoder (the backbone, a timm ViT) sees the patches of a context block; a
    narrow ViT predictor predicts, from its tokens and the target blocks' positions, what an
    EMA target encoder computes for the target blocks' patches from the whole image (layer-
    normalised). Loss term: ``ijepa``. Schedule: ``momentum``. k-NN, the online probe and the
    export use the target encoder with the ViT's own pooling (the recipes: ``class_token:
    false, global_pool: avg``, the mean of the patch tokens, as the paper's evaluations).

    Masks are drawn on the device for the global batch; context and target index lists are
    padded to fixed lengths (the most patches a block can hold) and padding is masked out of
    attention and of the loss, so a step needs no host sync. The official collator instead
    truncates every image's context to the batch's shortest.
    """

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        m = self.config
        vit = check_vit(self.backbone, "ijepa")
        lightly_utils.initialize_positional_embedding(vit.pos_embed, "sincos", vit.num_prefix_tokens)
        self.grid = tuple(vit.patch_embed.grid_size)
        views = tuple(cfg.augment.size // p for p in vit.patch_embed.patch_size)
        if views != self.grid:
            raise UserError(f"ijepa: augment.size={cfg.augment.size} makes a {views} patch grid, the ViT's is "
                            f"{self.grid}: set model.timm_kwargs.img_size={cfg.augment.size}")
        self.predictor = IJEPAPredictor(vit.patch_embed.num_patches, vit.embed_dim, m.pred_dim, m.pred_depth,
                                        m.pred_heads or vit.blocks[0].attn.num_heads)
        self.context_length = ijepa_block_bound(self.grid, m.enc_mask_scale, (1.0, 1.0))
        self.target_length = ijepa_block_bound(self.grid, m.pred_mask_scale, m.aspect_ratio)
        with torch.random.fork_rng(devices=[]):  # its own init is overwritten by the backbone's weights
            target = create_backbone(teacher_model(cfg.model, 0.0))
        self.teacher = MomentumEncoder(target, source=self.backbone)
        self.criterion = IJEPALoss(m.loss)

    def schedules(self, steps_per_epoch: int, total_steps: int) -> Schedules:
        m = self.config
        return {"momentum": tabulate(lambda s: m.momentum_base + (m.momentum_end - m.momentum_base) * s / total_steps,
                                     total_steps)}

    def ssl_step(self, views: list[Tensor]) -> tuple[LossTerms, Tensor]:
        m = self.config
        (images,) = views  # (B, 3, H, W): one view (augment.preset=crop)
        vit = self.backbone
        context, targets = ijepa_masks(len(images), self.grid, m.enc_mask_scale, m.pred_mask_scale, m.aspect_ratio,
                                       m.num_targets, m.min_keep, m.allow_overlap, generator=self.generator,
                                       device=images.device, shard=self.shard)
        ctx_index, ctx_valid = select_true(context.flatten(1), self.context_length)  # (B, C)
        tgt_index, tgt_valid = select_true(targets.flatten(2), self.target_length)  # (B, T, M)
        prefix = vit.num_prefix_tokens
        encoded = encode_visible(vit, images, ctx_index, ctx_valid)[:, prefix:]  # (B, C, E)
        predicted = self.predictor(encoded, ctx_index, ctx_valid, tgt_index, tgt_valid)  # (B, T, M, E)
        with torch.no_grad():
            t_vit = self.teacher.module
            tokens = encode_masked(t_vit, images)  # (B, prefix + L, E)
            features = t_vit.forward_head(tokens, pre_logits=True)  # (B, E)
            patches = F.layer_norm(tokens[:, prefix:], (tokens.shape[-1],))  # (B, L, E)
            target = lightly_utils.get_at_index(patches, tgt_index.flatten(1))  # (B, T * M, E)
        # every target block of a step has the same size: this mean is the global batch's
        loss = self.criterion(predicted.flatten(1, 2), target, tgt_valid.flatten(1))
        return {"ijepa": loss}, features

    def feature_model(self) -> nn.Module:
        return self.teacher.module

    def compile_targets(self) -> list[nn.Module]:
        return [self.teacher.module, self.predictor]

    def after_optimizer_step(self, applied: Tensor) -> None:
        self.teacher.update(self.backbone, self.scheduled["momentum"], applied)
