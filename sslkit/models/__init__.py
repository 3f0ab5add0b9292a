"""Backbones, heads, momentum (EMA) encoders, memory banks and MAE's masking parts."""

from lightly.models.modules import SimCLRProjectionHead

from sslkit.models.backbones import BACKBONES, TinyCNN, create_backbone
from sslkit.models.heads import DINOHead, mlp_head
from sslkit.models.memory_bank import MemoryBank
from sslkit.models.masking import MAEDecoder, encode_visible, patchify, random_token_mask
from sslkit.models.momentum import MomentumEncoder, cosine_momentum
from sslkit.models.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "BACKBONES",
    "DINOHead",
    "MAEDecoder",
    "MemoryBank",
    "MomentumEncoder",
    "SimCLRProjectionHead",
    "SyncBatchNorm",
    "TinyCNN",
    "convert_sync_batchnorm",
    "cosine_momentum",
    "create_backbone",
    "encode_visible",
    "mlp_head",
    "patchify",
    "random_token_mask",
]
