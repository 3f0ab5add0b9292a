"""Masked-image parts: MAE's random patch masking, a ViT encoder that runs on a subset of the
patches only (MAE's visible patches, I-JEPA's context), a ViT encoder whose masked patches are
replaced by a mask token (iBOT, DINOv2), and MAE's light decoder that predicts the pixels of
the masked patches.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
https://arxiv.org/abs/2111.06377. Block-wise masks: ``sslkit.models.block_masks``.
"""

from __future__ import annotations

import torch
from lightly.models import utils as lightly_utils
from lightly.models.modules import MaskedVisionTransformerDecoderTIMM
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from sslkit.errors import UserError

patchify = lightly_utils.patchify  # (B, C, H, W) -> (B, L, p * p * C), MAE's patch layout


def random_token_mask(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    shard: tuple[int, int] = (0, 1),
) -> tuple[Tensor, Tensor]:
    """MAE's per-sample random masking: (idx_keep (B, K), idx_mask (B, L - K)) patch indices.

    K = int(L * (1 - mask_ratio)) patches stay visible, chosen uniformly per sample by sorting
    random noise. ``shard = (rank, world_size)`` draws the noise for the global batch and keeps
    this process's rows, so the masks of a step do not depend on how it is split over processes.
    """
    keep = int(num_patches * (1 - mask_ratio) + 1e-6)  # MAE's count, robust to float rounding
    if not 0 < keep < num_patches:
        raise UserError(f"mask_ratio={mask_ratio} leaves {keep} of {num_patches} patches visible; "
                         "pick a ratio that keeps at least one and masks at least one")
    rank, world_size = shard
    noise = torch.rand(batch * world_size, num_patches, generator=generator, device=device)
    order = noise[rank * batch:(rank + 1) * batch].argsort(dim=1)  # (B, L)
    return order[:, :keep], order[:, keep:]


def check_vit(model: nn.Module, method: str) -> VisionTransformer:
    """``model`` if it is a timm VisionTransformer, else an error that says what to use."""
    if not isinstance(model, VisionTransformer):
        raise UserError(
            f"{method} needs a timm VisionTransformer backbone (e.g. model.backbone=vit_small_patch16_224), "
            f"got {type(model).__name__}"
        )
    return model


def encode_visible(vit: VisionTransformer, images: Tensor, idx_keep: Tensor, valid: Tensor | None = None) -> Tensor:
    """Run ``vit`` on the visible patches only: the encoder's cost falls with the mask ratio.

    images: (B, C, H, W); idx_keep: (B, K) patch indices -> (B, prefix + K, E) normalised tokens,
    the class (prefix) tokens first. Position embeddings are added before the patches are
    dropped, as in MAE. ``valid`` (B, K) bool: where images keep different numbers of patches
    (I-JEPA's context), ``idx_keep`` is padded and only its valid entries are attended to.
    """
    tokens = vit._pos_embed(vit.patch_embed(images))  # (B, prefix + L, E)
    prefix = vit.num_prefix_tokens
    visible = lightly_utils.get_at_index(tokens[:, prefix:], idx_keep)  # (B, K, E)
    tokens = vit.norm_pre(torch.cat([tokens[:, :prefix], visible], dim=1))
    if valid is None:
        return vit.norm(vit.blocks(tokens))
    keys = torch.cat([valid.new_ones(len(valid), prefix), valid], dim=1)[:, None, None]  # (B, 1, 1, prefix + K)
    for block in vit.blocks:
        tokens = block(tokens, attn_mask=keys)
    return vit.norm(tokens)


def encode_masked(vit: VisionTransformer, images: Tensor, mask: Tensor | None = None,
                  mask_token: Tensor | None = None) -> Tensor:
    """Run ``vit`` on every patch, those of ``mask`` replaced by ``mask_token`` before the
    position embeddings are added (iBOT, DINOv2's student); without ``mask`` the plain forward.

    images: (B, C, H, W); mask: (B, h, w) bool over the patch grid; mask_token: (E,) ->
    (B, prefix + h * w, E) normalised tokens, the prefix (class, register) tokens first.
    """
    x = vit.patch_embed(images)  # (B, L, E), or (B, h, w, E) with dynamic_img_size
    if mask is not None:
        x = torch.where(mask.reshape(*x.shape[:-1], 1), mask_token.to(x.dtype), x)
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
    return vit.norm(vit.blocks(x))


class MAEDecoder(nn.Module):
    """Embeds the visible tokens, fills the masked positions with a mask token, adds fixed
    sine-cosine positions, runs a few transformer blocks (lightly's
    ``MaskedVisionTransformerDecoderTIMM``) and predicts each masked patch's pixels.

    Shapes: tokens (B, prefix + K, E) from ``encode_visible``, idx_keep (B, K), idx_mask
    (B, M) patch indices -> (B, M, patch_size^2 x in_chans).
    """

    def __init__(
        self,
        num_patches: int,
        patch_size: int,
        encoder_dim: int,
        dim: int = 512,
        depth: int = 8,
        heads: int = 16,
        in_chans: int = 3,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(encoder_dim, dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(num_patches, dim, depth, heads, num_prefix_tokens)
        self.predict = nn.Linear(dim, patch_size**2 * in_chans)

    def forward(self, tokens: Tensor, idx_keep: Tensor, idx_mask: Tensor) -> Tensor:
        p = self.num_prefix_tokens
        x = self.embed(tokens)  # (B, p + K, D)
        full = x.new_zeros(len(x), self.decoder.sequence_length, x.shape[-1])  # (B, p + L, D)
        full[:, :p] = x[:, :p]
        full = lightly_utils.set_at_index(full, idx_keep + p, x[:, p:])
        out = self.decoder(full, idx_mask=idx_mask + p)  # masked positions get the mask token
        return self.predict(lightly_utils.get_at_index(out, idx_mask + p))  # (B, M, P)
