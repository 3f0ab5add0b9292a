"""MAE: reconstruct the pixels of masked patches from the visible ones."""

from __future__ import annotations

from typing import Optional

import torch
from lightly.models import utils as lightly_utils
from torch import nn

from sslkit.config import Config
from sslkit.losses import MAELoss
from sslkit.methods.base import METHODS, Method
from sslkit.models import MAEDecoder, encode_visible, patchify, random_token_mask
from sslkit.models.masking import check_vit


@METHODS.register("mae")
class MAE(Method):
    """He et al. 2022, https://arxiv.org/abs/2111.06377: a timm ViT encodes the visible
    ``1 - mask_ratio`` of the patches, a light decoder predicts the masked ones, and the loss
    is on the masked patches only (per-patch normalised pixels with ``norm_pix_loss``).

    k-NN and the exported backbone use the ViT's own pooling: set
    ``model.timm_kwargs: {global_pool: avg, fc_norm: false}`` for the mean of the patch tokens
    (the MAE recipes do) or leave timm's default ``token`` for the class token. The online
    probe reads the same pooling of the visible tokens, so it costs no extra forward pass.
    """

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        m = cfg.method
        vit = check_vit(self.backbone, "mae")
        # MAE's fixed sine-cosine position embedding
        lightly_utils.initialize_positional_embedding(vit.pos_embed, "sincos", vit.num_prefix_tokens)
        self.patch_size = vit.patch_embed.patch_size[0]
        self.decoder = MAEDecoder(
            vit.patch_embed.num_patches, self.patch_size, vit.embed_dim, m.decoder_dim, m.decoder_depth,
            m.decoder_heads, num_prefix_tokens=vit.num_prefix_tokens,
        )
        self.criterion = MAELoss(m.norm_pix_loss)

    def compile_targets(self) -> list[nn.Module]:
        # the encoder runs through encode_visible, not the backbone's forward: compile its blocks
        return [self.backbone.blocks, self.decoder]

    def ssl_step(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        (images,) = views  # (B, 3, H, W): MAE takes one view (augment.preset=single)
        patches = patchify(images, self.patch_size)  # (B, L, p * p * 3)
        idx_keep, idx_mask = random_token_mask(
            len(images), patches.shape[1], self.cfg.method.mask_ratio, self.generator, images.device, self.shard
        )
        tokens = encode_visible(self.backbone, images, idx_keep)  # (B, prefix + K, E)
        pred = self.decoder(tokens, idx_keep, idx_mask)  # (B, M, p * p * 3)
        loss = self.criterion(pred, lightly_utils.get_at_index(patches, idx_mask))
        return loss, self.backbone.forward_head(tokens, pre_logits=True)  # (B, E)
