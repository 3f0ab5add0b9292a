"""Block-wise patch masks drawn on the device, without host syncs: iBOT's / DINOv2's masks of
the student's patches, and I-JEPA's context and target blocks.

Both follow their official samplers (dinov2 ``data/masking.py`` ``MaskingGenerator`` and
``data/collate.py``; ijepa ``src/masks/multiblock.py``, which lightly's ``random_block_mask``
and ``IJEPAMaskCollator`` port), but draw every sample's blocks at once as tensors from the
engine's generator. A sampler that retries until a block fits becomes a fixed number of
vectorised attempts, and variable-length index lists become fixed-length ones with a validity
mask (``select_true``), so shapes never depend on the draw. ``shard = (rank, world_size)``
draws for the global batch and keeps this process's rows, so masks do not depend on how a
batch is split over processes.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

Device = Optional[torch.device | str]


def _block(top: Tensor, left: Tensor, h: Tensor, w: Tensor, grid: tuple[int, int]) -> Tensor:
    """(..., ) corners and sides -> (..., H, W) bool rectangles."""
    rows = torch.arange(grid[0], device=top.device)
    cols = torch.arange(grid[1], device=top.device)
    in_rows = (rows >= top[..., None]) & (rows < (top + h)[..., None])  # (..., H)
    in_cols = (cols >= left[..., None]) & (cols < (left + w)[..., None])  # (..., W)
    return in_rows[..., :, None] & in_cols[..., None, :]


def _image_targets(total: int, mask_probability: float, mask_ratio: tuple[float, float]) -> tuple[int, list[float]]:
    """dinov2's collate: ``int(total * mask_probability)`` images get masks, the i-th of them
    a ratio in ``[probs[i], probs[i + 1]]`` of an even split of ``mask_ratio``."""
    masked = int(total * mask_probability)
    lo, hi = mask_ratio
    return masked, [lo + (hi - lo) * i / masked for i in range(masked + 1)] if masked else [lo]


def block_mask_bound(batch: int, grid: tuple[int, int], mask_probability: float = 0.5,
                     mask_ratio: tuple[float, float] = (0.1, 0.5), world_size: int = 1, views: int = 1) -> int:
    """The most patches ``block_mask`` can mask in one process's ``views * batch`` images (the
    length to select masked patches with ``select_true``)."""
    patches = grid[0] * grid[1]
    masked, probs = _image_targets(views * batch * world_size, mask_probability, mask_ratio)
    caps = sorted((int(patches * p) + 1 for p in probs[1:]), reverse=True)  # + 1: float32 rounding on the device
    return max(1, min(sum(caps[:views * batch]), views * batch * patches))


def block_mask(
    batch: int,
    grid: tuple[int, int],
    mask_probability: float = 0.5,
    mask_ratio: tuple[float, float] = (0.1, 0.5),
    min_block_patches: int = 4,
    max_block_patches: Optional[int] = None,
    block_aspect: tuple[float, float] = (0.3, 1 / 0.3),
    attempts: int = 30,
    generator: Optional[torch.Generator] = None,
    device: Device = None,
    shard: tuple[int, int] = (0, 1),
    views: int = 1,
) -> Tensor:
    """iBOT / DINOv2 block-wise masks: (views * B, H, W) bool, True = masked, for ``views``
    views of this process's B images (view-major, as the views are concatenated).

    Of the global batch of ``views`` views, ``int(B * world * mask_probability)`` images (at random positions)
    get a target of ``int(L * r)`` patches, ``r`` uniform in the i-th of as many even slices of
    ``mask_ratio`` (dinov2's collate); the others none. Rectangles of ``min_block_patches`` to
    ``min(remaining, max_block_patches)`` patches (default ``L / 2``, dinov2's) with aspect
    ratio log-uniform in ``block_aspect`` are added while a rectangle fits in the grid, adds at
    least one new patch and does not overshoot the target (dinov2's ``MaskingGenerator``), for
    ``attempts`` vectorised rounds: an image may end below its target, never above.

    Examples:
        >>> import torch
        >>> from sslkit.models import block_mask
        >>> masks = block_mask(4, (8, 8), generator=torch.Generator().manual_seed(0), views=2)
        >>> masks.shape, int((masks.flatten(1).sum(1) > 0).sum())  # half of the 8 views masked
        (torch.Size([8, 8, 8]), 4)
    """
    height, width = grid
    patches = height * width
    max_block = patches // 2 if max_block_patches is None else max_block_patches
    rank, world_size = shard
    total = views * batch * world_size
    masked = _image_targets(total, mask_probability, mask_ratio)[0]
    kw = {"generator": generator, "device": device}
    edges = torch.linspace(mask_ratio[0], mask_ratio[1], masked + 1, device=device)  # = probs, made on the device
    ratios = edges[:-1] + (edges[1:] - edges[:-1]) * torch.rand(masked, **kw)  # (masked,)
    targets = torch.cat([(patches * ratios).floor(), torch.zeros(total - masked, device=device)])
    targets = targets[torch.rand(total, **kw).argsort()]  # masked images at random places
    mask = torch.zeros(total, height, width, dtype=torch.bool, device=device)
    count = torch.zeros(total, device=device)
    log_lo, log_hi = math.log(block_aspect[0]), math.log(block_aspect[1])
    for _ in range(attempts):
        draw = torch.rand(4, total, **kw)
        remaining = torch.clamp(targets - count, max=max_block)
        area = min_block_patches + draw[0] * (remaining - min_block_patches)
        aspect = torch.exp(log_lo + draw[1] * (log_hi - log_lo))
        h = torch.round(torch.sqrt(area * aspect))
        w = torch.round(torch.sqrt(area / aspect))
        fits = (h < height) & (w < width)
        top = (draw[2] * (height - h + 1)).floor()  # random.randint(0, H - h)
        left = (draw[3] * (width - w + 1)).floor()
        block = _block(top, left, h, w, grid)  # (total, H, W)
        new = (block & ~mask).flatten(1).sum(1)
        take = fits & (new > 0) & (new <= remaining) & (count < targets)
        mask |= block & take[:, None, None]
        count += new * take
    return mask.view(views, world_size, batch, height, width)[:, rank].flatten(0, 1)


def select_true(mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """The positions of ``mask``'s True entries along its last dim, padded to ``length``:
    (index (..., length) long, valid (..., length) bool). True entries come first, in order;
    ``length`` must be at least the most True entries of any row."""
    order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[..., :length]
    return order, mask.gather(-1, order)


def _ijepa_block_side(scale: float, aspect: float, grid: tuple[int, int]) -> tuple[int, int]:
    """I-JEPA's block size for scale and aspect (host version, for bounds)."""
    keep = int(grid[0] * grid[1] * scale)
    h = min(int(round(math.sqrt(keep * aspect))), grid[0] - 1)
    w = min(int(round(math.sqrt(keep / aspect))), grid[1] - 1)
    return max(h, 1), max(w, 1)


def ijepa_block_bound(grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float]) -> int:
    """The most patches an I-JEPA block of ``scale`` and ``aspect`` ranges can hold (both are
    drawn from one uniform number, as in the official sampler)."""
    steps = 4096
    return max(math.prod(_ijepa_block_side(scale[0] + t * (scale[1] - scale[0]) / steps,
                                           aspect[0] + t * (aspect[1] - aspect[0]) / steps, grid))
               for t in range(steps + 1))


def _ijepa_sides(u: Tensor, scale: tuple[float, float], aspect: tuple[float, float], grid: tuple[int, int]
                 ) -> tuple[Tensor, Tensor]:
    keep = torch.floor(grid[0] * grid[1] * (scale[0] + u * (scale[1] - scale[0])))
    ratio = aspect[0] + u * (aspect[1] - aspect[0])
    h = torch.round(torch.sqrt(keep * ratio)).clamp(1, grid[0] - 1)
    w = torch.round(torch.sqrt(keep / ratio)).clamp(1, grid[1] - 1)
    return h, w


def ijepa_masks(
    batch: int,
    grid: tuple[int, int],
    enc_scale: tuple[float, float] = (0.85, 1.0),
    pred_scale: tuple[float, float] = (0.15, 0.2),
    aspect: tuple[float, float] = (0.75, 1.5),
    num_targets: int = 4,
    min_keep: int = 10,
    allow_overlap: bool = False,
    attempts: int = 20,
    generator: Optional[torch.Generator] = None,
    device: Device = None,
    shard: tuple[int, int] = (0, 1),
) -> tuple[Tensor, Tensor]:
    """I-JEPA's multi-block masks: (context (B, H, W) bool, targets (B, num_targets, H, W) bool).

    One target block size (scale in ``pred_scale``, aspect in ``aspect``) and one context block
    size (scale in ``enc_scale``, square) per step, shared by the global batch as in the
    official sampler; per image, ``num_targets`` target blocks at random places and a context
    block without the targets' patches (unless ``allow_overlap``). The context block's place is
    the first of ``attempts`` draws that keeps more than ``min_keep`` patches; where none does,
    the first draw without removing the targets (the official sampler relaxes its constraints
    after repeated failures). Blocks never touch the last row or column (``randint(0, H - h)``,
    as the official sampler).

    Examples:
        >>> import torch
        >>> from sslkit.models import ijepa_masks
        >>> context, targets = ijepa_masks(2, (14, 14), generator=torch.Generator().manual_seed(0))
        >>> context.shape, targets.shape, bool((context[:, None] & targets).any())
        (torch.Size([2, 14, 14]), torch.Size([2, 4, 14, 14]), False)
    """
    height, width = grid
    rank, world_size = shard
    total = batch * world_size
    kw = {"generator": generator, "device": device}
    sizes = torch.rand(2, **kw)
    pred_h, pred_w = _ijepa_sides(sizes[0], pred_scale, aspect, grid)
    enc_h, enc_w = _ijepa_sides(sizes[1], enc_scale, (1.0, 1.0), grid)
    corners = torch.rand(2, total, num_targets, **kw)
    targets = _block((corners[0] * (height - pred_h)).floor(), (corners[1] * (width - pred_w)).floor(),
                     pred_h, pred_w, grid)  # (total, T, H, W)
    corners = torch.rand(2, total, attempts, **kw)
    context = _block((corners[0] * (height - enc_h)).floor(), (corners[1] * (width - enc_w)).floor(),
                     enc_h, enc_w, grid)  # (total, A, H, W)
    if not allow_overlap:
        constrained = context & ~targets.any(1, keepdim=True)
        ok = constrained.flatten(2).sum(-1) > min_keep  # (total, A)
        first = ok.to(torch.uint8).argmax(1)  # the first attempt that keeps enough (0 if none)
        chosen = constrained[torch.arange(total, device=context.device), first]  # (total, H, W)
        context = torch.where(ok.any(1)[:, None, None], chosen, context[:, 0])
    else:
        context = context[:, 0]
    rows = slice(rank * batch, (rank + 1) * batch)
    return context[rows], targets[rows]
