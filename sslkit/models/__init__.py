"""Backbones, heads, momentum (EMA) encoders, memory banks, masks and masked encoders, I-JEPA's predictor."""

from lightly.models.modules import SimCLRProjectionHead

from sslkit.models.backbones import BACKBONES, TinyCNN, create_backbone
from sslkit.models.heads import DINOHead, mlp_head
from sslkit.models.memory_bank import MemoryBank
from sslkit.models.ijepa import IJEPAPredictor
from sslkit.models.block_masks import block_mask, block_mask_bound, ijepa_masks, select_true
from sslkit.models.masking import MAEDecoder, encode_masked, encode_visible, patchify, random_token_mask
from sslkit.models.momentum import MomentumEncoder, cosine_momentum
from sslkit.models.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "BACKBONES",
    "DINOHead",
    "IJEPAPredictor",
    "MAEDecoder",
    "MemoryBank",
    "MomentumEncoder",
    "SimCLRProjectionHead",
    "SyncBatchNorm",
    "TinyCNN",
    "convert_sync_batchnorm",
    "block_mask",
    "block_mask_bound",
    "cosine_momentum",
    "create_backbone",
    "encode_masked",
    "encode_visible",
    "ijepa_masks",
    "mlp_head",
    "patchify",
    "random_token_mask",
    "select_true",
]
