"""Batched augmentation ops with per-sample parameters.

Every op takes float images (B, C, H, W) and parameter tensors with one entry per sample,
and runs as a few whole-batch kernels: no Python loop over images and no host sync, so the
same code serves CPU tensors and GPU batches. Each op reproduces the torchvision/kornia
functional op of the same name on the same parameters (tests/test_augment.py checks this).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601 luma weights, as kornia (torchvision rounds the first to 0.2989)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@lru_cache(maxsize=None)
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small constant built once per device: building it per call would copy host to device."""
    return torch.tensor(values, device=device, dtype=dtype)


def _per_sample(values: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1), to broadcast over (B, C, H, W)."""
    return values.view(-1, 1, 1, 1)


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    attempts: int = 10,
) -> Tensor:
    """Random resized crop boxes with torchvision's ``RandomResizedCrop.get_params`` semantics.

    Area fraction uniform in ``scale``, aspect ratio (w/h) log-uniform in ``ratio``, side
    lengths rounded to whole pixels, position uniform over the valid offsets. Each sample draws
    ``attempts`` candidates at once and keeps the first that fits; a sample with none falls back
    to torchvision's centre crop.

    Returns (B, 4) float boxes ``x0, y0, w, h`` in pixels (whole numbers).
    """
    area = height * width
    u = torch.rand(batch, attempts, 2, generator=generator, device=device)  # (B, A, 2)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.sqrt(target * aspect).round()  # (B, A)
    h = torch.sqrt(target / aspect).round()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.int().argmax(1, keepdim=True)  # argmax returns the first maximum
    found = valid.any(1)  # (B,)
    fallback_w, fallback_h = _centre_crop_size(height, width, ratio)
    w = torch.where(found, w.gather(1, first).squeeze(1), fallback_w)  # (B,)
    h = torch.where(found, h.gather(1, first).squeeze(1), fallback_h)
    pos = torch.rand(batch, 2, generator=generator, device=device)  # (B, 2)
    # floor(u * (n + 1)) is uniform over 0..n; the minimum guards u*(n+1) rounding up to n+1
    x0 = torch.minimum((pos[:, 0] * (width - w + 1)).floor(), width - w)
    y0 = torch.minimum((pos[:, 1] * (height - h + 1)).floor(), height - h)
    x0 = torch.where(found, x0, (width - fallback_w) // 2)
    y0 = torch.where(found, y0, (height - fallback_h) // 2)
    return torch.stack([x0, y0, w, h], 1)


def _centre_crop_size(height: int, width: int, ratio: Sequence[float]) -> tuple[int, int]:
    """torchvision's fallback: the largest centred crop whose aspect ratio lies in ``ratio``."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return width, int(round(width / min(ratio)))
    if in_ratio > max(ratio):
        return int(round(height * max(ratio))), height
    return width, height


def resized_crop_flip(images: Tensor, boxes: Tensor, flip: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Crop ``boxes`` out of ``images``, resize them to ``size`` and mirror where ``flip``.

    One ``affine_grid``/``grid_sample`` (bilinear, align_corners=False) with a per-sample 2x3
    matrix does crop, resize and flip together. Inside the box this equals torchvision's
    ``resized_crop(..., antialias=False)`` followed by ``hflip``; where an upscaled crop samples
    within half a pixel of its edge, the neighbouring image pixel is blended in instead of the
    edge being repeated (no antialiasing when a crop is shrunk, like kornia).

    images: (B, C, H, W) float; boxes: (B, 4) ``x0, y0, w, h`` in pixels; flip: (B,) bool.
    Returns (B, C, size, size), or (B, C, *size) for a pair.
    """
    batch, channels, height, width = images.shape
    out_h, out_w = (size, size) if isinstance(size, int) else size
    boxes = boxes.to(images.dtype)
    x0, y0, w, h = boxes.unbind(1)  # (B,) each
    # output x in [-1, 1] maps to input pixel x0 + (x + 1) / 2 * w - 0.5, in grid units:
    scale_x = torch.where(flip, -w, w) / width
    shift_x = (2 * x0 + w) / width - 1
    scale_y = h / height
    shift_y = (2 * y0 + h) / height - 1
    zero = torch.zeros_like(w)
    theta = torch.stack([scale_x, zero, shift_x, zero, scale_y, shift_y], 1).view(batch, 2, 3)
    grid = F.affine_grid(theta, [batch, channels, out_h, out_w], align_corners=False)  # (B, h, w, 2)
    # border padding repeats the image edge, as torchvision does for a crop at the edge
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    weights = _constant(LUMA_WEIGHTS, images.device, images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``adjust_brightness``: ``clamp(image * factor)``; factor: (B,)."""
    return (images * _per_sample(factor)).clamp_(0, 1)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``adjust_contrast``: blend with the image's mean luma; factor: (B,)."""
    weights = _constant(LUMA_WEIGHTS, images.device, images.dtype)
    mean = images.mean((2, 3)) @ weights  # (B,): the mean of the luma, without the luma image
    return torch.lerp(_per_sample(mean), images, _per_sample(factor)).clamp_(0, 1)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``adjust_saturation``: blend with the luma image; factor: (B,)."""
    return torch.lerp(rgb_to_grayscale(images), images, _per_sample(factor)).clamp_(0, 1)


def adjust_hue(images: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``adjust_hue`` (kornia's with ``2 * pi * factor``): shift HSV hue by ``factor`` turns.

    The HSV round trip in closed form: value (max) and chroma (max - min) stay, and each channel
    is read off the hue hexagon at its own offset. factor: (B,) in [-0.5, 0.5].
    """
    value = images.amax(1, keepdim=True)  # (B, 1, H, W)
    chroma = value - images.amin(1, keepdim=True)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))  # grey pixels have hue 0
    r, g, b = images.split(1, dim=1)
    # hue in sixths of a turn, the sextant picked by the first maximal channel (as kornia)
    hue6 = torch.where(
        (r >= g) & (r >= b), (g - b) / safe, torch.where(g >= b, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    hue6 = hue6 + 6 * _per_sample(factor)
    offsets = _constant((5.0, 3.0, 1.0), images.device, images.dtype).view(1, 3, 1, 1)  # R, G, B
    k = torch.remainder(offsets + hue6, 6)  # (B, 3, H, W)
    return value - chroma * torch.minimum(k, 4 - k).clamp_(0, 1)


def random_grayscale(images: Tensor, apply: Tensor) -> Tensor:
    """torchvision's ``rgb_to_grayscale(num_output_channels=3)`` where ``apply`` (B,) is true."""
    return torch.where(_per_sample(apply), rgb_to_grayscale(images), images)


def gaussian_kernel1d(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalised Gaussian taps (B, K) for per-sample sigma (B,), as torchvision and kornia."""
    x = torch.arange(kernel_size, device=sigma.device, dtype=sigma.dtype) - (kernel_size - 1) / 2
    pdf = torch.exp(-0.5 * (x / sigma[:, None]) ** 2)
    return pdf / pdf.sum(1, keepdim=True)


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int, apply: Tensor | None = None) -> Tensor:
    """Separable Gaussian blur with per-sample sigma (B,) and reflect padding.

    The batch becomes the channels of one grouped convolution, so each sample gets its own
    kernel in a single call per direction. Samples where ``apply`` (B,) is false get the
    identity kernel. Matches ``kornia.filters.gaussian_blur2d(..., border_type="reflect")``.
    """
    batch, channels, height, width = images.shape
    taps = gaussian_kernel1d(sigma.to(images.dtype), kernel_size)  # (B, K)
    if apply is not None:
        identity = torch.zeros_like(taps[0])
        identity[kernel_size // 2] = 1
        taps = torch.where(apply[:, None], taps, identity)
    taps = taps.repeat_interleave(channels, 0)  # (B*C, K)
    pad = kernel_size // 2
    x = F.pad(images.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, taps.view(-1, 1, 1, kernel_size), groups=batch * channels)
    x = F.conv2d(x, taps.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return x.view(batch, channels, height, width)


def solarize(images: Tensor, threshold: float, apply: Tensor) -> Tensor:
    """torchvision's ``solarize`` (invert pixels >= threshold) where ``apply`` (B,) is true."""
    return torch.where(_per_sample(apply) & (images >= threshold), 1 - images, images)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(image - mean) / std per channel."""
    mean_t = _constant(tuple(mean), images.device, images.dtype).view(1, -1, 1, 1)
    std_t = _constant(tuple(std), images.device, images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t
