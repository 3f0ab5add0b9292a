"""I-JEPA's predictor: a narrow ViT that predicts the target encoder's representations of the
target blocks from the context encoder's tokens and the targets' positions.

Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture", CVPR 2023, https://arxiv.org/abs/2301.08243 (official code:
facebookresearch/ijepa, ``src/models/vision_transformer.py``, ``VisionTransformerPredictor``;
lightly's ``IJEPAPredictorTIMM`` ports it).
"""

from __future__ import annotations

from functools import partial

import torch
from lightly.models import utils as lightly_utils
from timm.models.vision_transformer import Block
from torch import Tensor, nn


class IJEPAPredictor(nn.Module):
    """Embeds the context tokens to the predictor's width and adds their fixed 2-D sine-cosine
    positions; for each target block, appends a learned mask token plus the position of every
    target patch; runs ``depth`` transformer blocks over context and target tokens; and maps
    the target tokens back to the encoder's width. Each target block is predicted in a sequence
    of its own (batch ``B * T``), as in the official code. Padded context and target entries
    (``valid`` False) are not attended to, so images with different numbers of context patches
    share one batch.

    Args:
        num_patches: the patch grid's size L (a square grid).
        embed_dim: the encoder's width E.
        dim: the predictor's width (I-JEPA: 384 for ViT-H, predictor depth 12).
        depth: its transformer blocks.
        heads: its attention heads.
        mlp_ratio: its blocks' MLP width over ``dim``.
        drop_path_rate: stochastic depth, rising linearly over the blocks to this rate.

    Shapes:
        context: (B, C, E) the context encoder's tokens; ctx_index, ctx_valid: (B, C) their patch
        positions and validity; tgt_index, tgt_valid: (B, T, M) the positions and validity of the
        M (padded) patches of each of T target blocks -> (B, T, M, E) predictions.

    Examples:
        >>> import torch
        >>> from sslkit.models import IJEPAPredictor
        >>> predictor = IJEPAPredictor(num_patches=16, embed_dim=32, dim=16, depth=1, heads=2)
        >>> ctx, tgt = torch.arange(8).expand(2, 8), torch.arange(12, 16).expand(2, 3, 4)
        >>> out = predictor(torch.randn(2, 8, 32), ctx, torch.ones(2, 8, dtype=torch.bool),
        ...                 tgt, torch.ones(2, 3, 4, dtype=torch.bool))
        >>> out.shape
        torch.Size([2, 3, 4, 32])
    """

    def __init__(self, num_patches: int, embed_dim: int, dim: int = 384, depth: int = 12, heads: int = 12,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", torch.zeros(1, num_patches, dim))  # fixed, not learned
        lightly_utils.initialize_2d_sine_cosine_positional_embedding(self.pos_embed, num_prefix_tokens=0)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[
            Block(dim, heads, mlp_ratio, qkv_bias=True, drop_path=rate, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for rate in rates
        ])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, embed_dim)
        self.apply(_init)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, context: Tensor, ctx_index: Tensor, ctx_valid: Tensor, tgt_index: Tensor,
                tgt_valid: Tensor) -> Tensor:
        batch, targets, length = tgt_index.shape
        pos = self.pos_embed.expand(batch, -1, -1)  # (B, L, D)
        x = self.embed(context) + lightly_utils.get_at_index(pos, ctx_index)  # (B, C, D)
        x = x.repeat_interleave(targets, dim=0)  # (B * T, C, D), target blocks of an image in a row
        tgt_pos = lightly_utils.get_at_index(pos.repeat_interleave(targets, dim=0), tgt_index.flatten(0, 1))
        x = torch.cat([x, self.mask_token + tgt_pos], dim=1)  # (B * T, C + M, D)
        keys = torch.cat([ctx_valid.repeat_interleave(targets, dim=0), tgt_valid.flatten(0, 1)], dim=1)
        for block in self.blocks:
            x = block(x, attn_mask=keys[:, None, None])  # padding is not attended to
        out = self.proj(self.norm(x[:, context.shape[1]:]))  # (B * T, M, E)
        return out.view(batch, targets, length, -1)


def _init(module: nn.Module) -> None:
    """The official predictor's init: truncated normal (std 0.02) linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
