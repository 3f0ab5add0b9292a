"""MAE: He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners",
https://arxiv.org/abs/2111.06377 (official code: facebookresearch/mae)."""

from __future__ import annotations

from typing import ClassVar, Optional

from lightly.models import utils as lightly_utils
from pydantic import Field
from torch import Tensor, nn

from sslkit.config import Config, Count, MethodConfig
from sslkit.losses import MAELoss
from sslkit.methods.base import METHODS, LossTerms, Method
from sslkit.models import MAEDecoder, encode_visible, patchify, random_token_mask
from sslkit.models.masking import check_vit


class MAEConfig(MethodConfig):
    """Defaults: the paper's: 75% of the patches masked, a decoder of 8 blocks of width 512
    with 16 heads, per-patch normalised pixels as the target (the paper's better target; the
    official code's flag ``--norm_pix_loss``, which its pre-training commands set), one view."""

    preset: ClassVar[str] = "single"
    name: str = "mae"
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    decoder_dim: Count = 512
    decoder_depth: Count = 8
    decoder_heads: Count = 16
    norm_pix_loss: bool = True


@METHODS.register("mae", config=MAEConfig)
class MAE(Method):
    """A timm ViT encodes the visible ``1 - mask_ratio`` of the patches, a light decoder predicts
    the masked ones, and the loss is on the masked patches only. Loss term: ``reconstruction``.

    k-NN and the exported backbone use the ViT's own pooling: set
    ``model.timm_kwargs: {global_pool: avg, fc_norm: false}`` for the mean of the patch tokens
    (the MAE recipes do) or leave timm's default ``token`` for the class token. The online
    probe reads the same pooling of the visible tokens, so it costs no extra forward pass.
    """

    def __init__(self, cfg: Config, num_classes: Optional[int] = None) -> None:
        super().__init__(cfg, num_classes)
        m = self.config
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

    def ssl_step(self, views: list[Tensor]) -> tuple[LossTerms, Tensor]:
        (images,) = views  # (B, 3, H, W): MAE takes one view (augment.preset=single)
        patches = patchify(images, self.patch_size)  # (B, L, p * p * 3)
        idx_keep, idx_mask = random_token_mask(
            len(images), patches.shape[1], self.config.mask_ratio, self.generator, images.device, self.shard
        )
        tokens = encode_visible(self.backbone, images, idx_keep)  # (B, prefix + K, E)
        pred = self.decoder(tokens, idx_keep, idx_mask)  # (B, M, p * p * 3)
        loss = self.criterion(pred, lightly_utils.get_at_index(patches, idx_mask))
        return {"reconstruction": loss}, self.backbone.forward_head(tokens, pre_logits=True)  # (B, E)
