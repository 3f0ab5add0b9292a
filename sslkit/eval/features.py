"""Backbone features of clean (unaugmented) images, gathered across processes."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    import accelerate


def iter_features(
    backbone: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    transform: Callable[..., Tensor],
    accelerator: "accelerate.Accelerator | None" = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Embed ``batches`` one at a time with ``backbone`` in eval mode (restored afterwards).

    Same arguments as :func:`extract_features`. Yields ``(features (b, D) float32, labels (b,)
    int64)`` per batch, on the batches' device: a caller that streams them somewhere (``sslkit
    embed`` writes them to disk) never holds all of them.
    """
    if accelerator is not None:
        # A DDP wrapper may run collectives in forward; ranks whose shards differ by one
        # batch would then hang, so embed with the bare module.
        backbone = accelerator.unwrap_model(backbone)
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    was_training = backbone.training
    backbone.eval()
    try:
        for batch in batches:
            images, targets = batch
            sizes = getattr(batch, "sizes", None)  # (b, 2): each image's own size (sslkit.data.Batch)
            x = transform(images) if sizes is None else transform(images, sizes)
            with torch.no_grad(), autocast():
                f = backbone(x)
            yield f.flatten(1).float(), targets.long()  # (b, D), (b,)
    finally:
        backbone.train(was_training)


def extract_features(
    backbone: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    transform: Callable[..., Tensor],
    accelerator: "accelerate.Accelerator | None" = None,
    gather: bool = True,
) -> tuple[Tensor, Tensor]:
    """Embed every image of ``batches`` with ``backbone`` in eval mode.

    Args:
        backbone: maps (b, 3, H, W) float images to (b, D) features (extra trailing
            dimensions, e.g. (b, D, 1, 1), are flattened).
        batches: yields ``(images uint8 (b, C, H, W), labels int64 (b,))`` on the device;
            under several processes each rank yields its own disjoint shard.
        transform: uint8 images -> normalised float images, without augmentation; called with
            the images' own sizes (b, 2) too when a batch carries them (``sslkit.data.Batch``).
        accelerator: gives autocast and the processes to gather from; None: one process,
            full precision.
        gather: True: every rank gets the features of every shard; False: its own only.

    Returns:
        features (N, D) float32 and labels (N,) int64, on the batches' device (k-NN and
        linear probes run there: no round trip through the host), in matching order; with
        ``gather`` every sample of every shard appears exactly once.
    """
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    for f, targets in iter_features(backbone, batches, transform, accelerator):
        feats.append(f)  # (b, D)
        labels.append(targets)
    if not feats:
        raise ValueError("extract_features got no batches")
    features = torch.cat(feats)  # (n, D) on the device
    targets = torch.cat(labels)  # (n,)
    if gather and accelerator is not None and accelerator.num_processes > 1:
        features, targets = _gather_uneven(accelerator, features, targets)
    return features, targets


def _gather_uneven(
    accelerator: "accelerate.Accelerator", features: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """All-gather per-rank tensors whose lengths differ, without duplicates or padding."""
    sizes = accelerator.gather(torch.tensor([features.shape[0]], device=features.device))  # (P,)
    padded_f = accelerator.gather(accelerator.pad_across_processes(features, dim=0))  # (P * m, D)
    padded_l = accelerator.gather(accelerator.pad_across_processes(labels, dim=0))  # (P * m,)
    m = padded_f.shape[0] // sizes.numel()
    keep = torch.cat([torch.arange(r * m, r * m + int(n), device=padded_f.device) for r, n in enumerate(sizes)])
    return padded_f[keep], padded_l[keep]
