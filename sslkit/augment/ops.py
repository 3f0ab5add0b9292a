"""Batched augmentation ops with per-sample parameters.

Every op takes float images (B, C, H, W) and parameter tensors with one entry per sample,
and runs as a few whole-batch kernels: no Python loop over images and no host sync, so the
same code serves CPU tensors and GPU batches. Each op reproduces the torchvision/kornia
functional op of the same name on the same parameters (tests/test_augment.py checks this).

Per-sample choices blend with ``torch.lerp`` and 0/1 weights (exact: weight 0 gives the start,
1 the end) rather than ``torch.where``: on the CPU, ``where`` over a (512, 3, 32, 32) batch
took 7 ms against 0.3 ms for ``lerp`` (torch 2.14, one thread); on a GPU both are cheap.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601 luma weights, as kornia and PIL (torchvision rounds the first to 0.2989)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


@lru_cache(maxsize=None)
def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small constant built once per device: building it per call would copy host to device."""
    return torch.tensor(values, device=device, dtype=dtype)


def _per_sample(values: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1), to broadcast over (B, C, H, W); (B, V) -> (B, V, 1, 1, 1) likewise."""
    return values[..., None, None, None]


def _choose(where_false: Tensor, where_true: Tensor, condition: Tensor) -> Tensor:
    """``torch.where(condition, where_true, where_false)`` as an exact 0/1 ``lerp`` (see above)."""
    return torch.lerp(where_false, where_true.expand_as(where_false), condition.to(where_false.dtype))


def sample_crop_boxes(
    batch: int,
    height: int | Tensor,
    width: int | Tensor,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    attempts: int = 10,
    rows: slice = slice(None),
) -> Tensor:
    """Random resized crop boxes with torchvision's ``RandomResizedCrop.get_params`` semantics.

    Area fraction uniform in ``scale``, aspect ratio (w/h) log-uniform in ``ratio``, side
    lengths rounded to whole pixels, position uniform over the valid offsets. Each sample draws
    ``attempts`` candidates at once and keeps the first that fits; a sample with none falls back
    to torchvision's centre crop.

    The random numbers are drawn for ``batch`` samples and the boxes made for ``rows`` of them
    (a process's slice of a global batch). ``height``, ``width``: the image size, one for all, or
    (R,) tensors with each kept row's own image size (R = the number of rows kept), so that
    every image is cropped over its whole extent with its own aspect.

    Returns (R, 4) float boxes ``x0, y0, w, h`` in pixels of each image (whole numbers).
    """
    u = torch.rand(batch, attempts, 2, generator=generator, device=device)[rows]  # (R, A, 2)
    pos = torch.rand(batch, 2, generator=generator, device=device)[rows]  # (R, 2)
    if torch.is_tensor(height):  # (R,) sizes: broadcast over the attempts
        height, width = height.to(u.dtype), width.to(u.dtype)
        rows_h, rows_w = height[:, None], width[:, None]  # (R, 1)
    else:  # Python numbers: no host-to-device copy
        rows_h, rows_w = height, width
    area = rows_h * rows_w
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.sqrt(target * aspect).round()  # (R, A)
    h = torch.sqrt(target / aspect).round()
    valid = (w > 0) & (w <= rows_w) & (h > 0) & (h <= rows_h)
    first = valid.int().argmax(1, keepdim=True)  # argmax returns the first maximum
    found = valid.any(1)  # (R,)
    fallback_w, fallback_h = _centre_crop_size(height, width, ratio)  # (R,) each, or numbers
    w = torch.where(found, w.gather(1, first).squeeze(1), fallback_w)  # (R,)
    h = torch.where(found, h.gather(1, first).squeeze(1), fallback_h)
    # floor(u * (n + 1)) is uniform over 0..n; the minimum guards u*(n+1) rounding up to n+1
    x0 = torch.minimum((pos[:, 0] * (width - w + 1)).floor(), width - w)
    y0 = torch.minimum((pos[:, 1] * (height - h + 1)).floor(), height - h)
    x0 = torch.where(found, x0, (width - fallback_w) // 2)
    y0 = torch.where(found, y0, (height - fallback_h) // 2)
    return torch.stack([x0, y0, w, h], 1)


def _centre_crop_size(
    height: int | Tensor, width: int | Tensor, ratio: Sequence[float]
) -> tuple[int | Tensor, int | Tensor]:
    """torchvision's fallback: the largest centred crop whose aspect ratio lies in ``ratio``;
    (R,) sizes in, (R,) crop widths and heights out (or numbers for numbers)."""
    in_ratio = width / height
    low, high = min(ratio), max(ratio)
    if not torch.is_tensor(in_ratio):
        if in_ratio < low:
            return width, int(round(width / low))
        if in_ratio > high:
            return int(round(height * high)), height
        return width, height
    # torchvision's int(round(x)) rounds half to even, as torch.round does
    w = torch.where(in_ratio > high, (height * high).round(), width)
    h = torch.where(in_ratio < low, (width / low).round(), height)
    return w, h


def image_boxes(boxes: Tensor, sizes: Tensor, canvas: tuple[int, int]) -> Tensor:
    """Boxes ``x0, y0, w, h`` (..., 4) in pixels of images of their own ``sizes`` (..., 2)
    (height, width) -> the same boxes on a canvas of ``canvas`` (height, width) to which each
    image was resized whole (so that ``resized_crop_flip`` crops the canvas)."""
    sy = canvas[0] / sizes[..., 0].to(boxes.dtype)  # (...,)
    sx = canvas[1] / sizes[..., 1].to(boxes.dtype)
    return boxes * torch.stack([sx, sy, sx, sy], -1)


def centre_square_boxes(sizes: Tensor, canvas: tuple[int, int]) -> Tensor:
    """(B, 4) canvas boxes of the centred square of side min(h, w) of each image of ``sizes``
    (B, 2): the evaluation crop (shorter side, centre), as torchvision's Resize + CenterCrop."""
    sizes = sizes.to(torch.float32)
    side = sizes.min(1).values  # (B,)
    boxes = torch.stack([(sizes[:, 1] - side) / 2, (sizes[:, 0] - side) / 2, side, side], 1)  # (B, 4)
    return image_boxes(boxes, sizes, canvas)


def resized_crop_flip(images: Tensor, boxes: Tensor, flip: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Crop ``boxes`` out of ``images``, resize them to ``size`` and mirror where ``flip``.

    One ``affine_grid``/``grid_sample`` (bilinear, align_corners=False) with a per-sample 2x3
    matrix does crop, resize and flip together. Inside the box this equals torchvision's
    ``resized_crop(..., antialias=False)`` followed by ``hflip``; where an upscaled crop samples
    within half a pixel of its edge, the neighbouring image pixel is blended in instead of the
    edge being repeated (no antialiasing when a crop is shrunk, like kornia).

    Several crops of each image: boxes (B, V, 4) and flip (B, V) give (B, V, C, size, size),
    still one ``grid_sample``: each image's V sampling grids are stacked along the output
    height, so the image is read V times but never copied V times. That result is a strided
    view of the (B, C, V * size, size) resampling (its views are not contiguous rows).

    images: (B, C, H, W) float; boxes: (B, 4) ``x0, y0, w, h`` in pixels, or (B, V, 4); flip:
    (B,) or (B, V) bool. Returns (B, C, size, size), or (B, V, C, size, size); (..., *size) for a pair.
    """
    batch, channels, height, width = images.shape
    out_h, out_w = (size, size) if isinstance(size, int) else size
    several = boxes.dim() == 3
    boxes = boxes.view(batch, -1, 4).to(images.dtype)  # (B, V, 4)
    views = boxes.shape[1]
    x0, y0, w, h = boxes.unbind(-1)  # (B, V) each
    # output x in [-1, 1] maps to input pixel x0 + (x + 1) / 2 * w - 0.5, in grid units:
    scale_x = torch.where(flip.view(batch, views), -w, w) / width
    shift_x = (2 * x0 + w) / width - 1
    scale_y = h / height
    shift_y = (2 * y0 + h) / height - 1
    # F.affine_grid(align_corners=False) of the matrix [[scale_x, 0, shift_x], [0, scale_y, shift_y]],
    # built from its two axes: its general (B, h*w, 3) x (B, 3, 2) product is 5x slower on the CPU
    xs = _pixel_centres(out_w, images.device, images.dtype)  # (w,)
    ys = _pixel_centres(out_h, images.device, images.dtype)  # (h,)
    grid_x = torch.addcmul(shift_x[..., None], scale_x[..., None], xs)  # (B, V, w)
    grid_y = torch.addcmul(shift_y[..., None], scale_y[..., None], ys)  # (B, V, h)
    grid = torch.stack([grid_x[:, :, None, :].expand(-1, -1, out_h, -1),
                        grid_y[..., None].expand(-1, -1, -1, out_w)], -1)  # (B, V, h, w, 2)
    # border padding repeats the image edge, as torchvision does for a crop at the edge
    out = F.grid_sample(images, grid.view(batch, views * out_h, out_w, 2), mode="bilinear",
                        padding_mode="border", align_corners=False)  # (B, C, V * h, w)
    out = out.view(batch, channels, views, out_h, out_w).transpose(1, 2)  # (B, V, C, h, w)
    return out if several else out.squeeze(1)


def _pixel_centres(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n,) the centres of n pixels in grid_sample's [-1, 1] coordinates (align_corners=False)."""
    return (torch.arange(n, device=device, dtype=dtype) * 2 + 1) / n - 1


def rgb_to_grayscale(images: Tensor) -> Tensor:
    """ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B``: sslkit's one RGB-to-gray conversion, of
    the augmentations, the datasets (``sslkit.data.match_channels``) and every image decoder.

    Float images keep their dtype. Integer (uint8) images are computed in float32 and rounded
    to the nearest level, so a gray image stored as RGB (R = G = B) comes back unchanged; PIL's
    ``convert("L")`` (16-bit fixed point) and torchvision's ``rgb_to_grayscale`` (0.2989,
    truncation) can differ from it by one level.

    Shapes: (..., 3, H, W) -> (..., 1, H, W).
    """
    r, g, b = images.unbind(-3)
    # Scalar weights: no constant to copy to the device; uint8 channels promote to float32.
    # Separate products and sums (no fused multiply-add): the same roundings on every device.
    gray = LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b
    if not images.is_floating_point():
        gray = gray.round_().to(images.dtype)
    return gray.unsqueeze(-3)


def adjust_brightness(images: Tensor, factor: Tensor, out: Tensor | None = None) -> Tensor:
    """torchvision's ``adjust_brightness``: ``clamp(image * factor)``; factor: (B,).

    Also (B, V, C, H, W) images with a (B, V) factor. ``out``: a tensor of the images' shape to
    write into (e.g. a contiguous one, for strided images), else a new one.
    """
    return torch.mul(images, _per_sample(factor), out=out).clamp_(0, 1)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``adjust_contrast``: blend with the image's mean luma; factor: (B,)."""
    weights = _constant(LUMA_WEIGHTS, images.device, images.dtype)
    mean = _per_sample(images.mean((2, 3)) @ weights)  # (B, 1, 1, 1): the mean luma, without the luma image
    # lerp(mean, images, factor), written out: lerp from a broadcast start is 6x slower on the CPU
    return (images - mean).mul_(_per_sample(factor)).add_(mean).clamp_(0, 1)


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
    safe = chroma + (chroma == 0).to(chroma.dtype)  # grey pixels (chroma 0) have hue 0
    r, g, b = images.split(1, dim=1)
    # hue in sixths of a turn, the sextant picked by the first maximal channel (as kornia):
    # (g - b) / chroma where red is maximal, (b - r) / chroma + 2 where green, else (r - g) / chroma + 4
    red = ((r >= g) & (r >= b)).to(images.dtype)  # (B, 1, H, W) 0/1
    green = (g >= b).to(images.dtype).mul_(1 - red)
    difference = torch.lerp(torch.lerp(r - g, b - r, green), g - b, red)
    hue6 = difference.div_(safe).sub_(green.mul_(2)).sub_(red.mul_(4)).add_(4 + 6 * _per_sample(factor))
    offsets = _constant((5.0, 3.0, 1.0), images.device, images.dtype).view(1, 3, 1, 1)  # R, G, B
    k = offsets + hue6  # (B, 3, H, W)
    # k mod 6 (3x faster than torch.remainder on the CPU; an ulp off at multiples of 6, where the
    # hexagon below is 0 either way), then value - chroma * clamp(min(k, 4 - k), 0, 1) with
    # min(k, 4 - k) = 2 - |k - 2|, in place: on the CPU each new full-size tensor costs more
    # than its arithmetic
    k = (k * (1 / 6)).floor_().mul_(-6).add_(k)
    return k.sub_(2).abs_().neg_().add_(2).clamp_(0, 1).mul_(chroma).neg_().add_(value)


def random_grayscale(images: Tensor, apply: Tensor) -> Tensor:
    """torchvision's ``rgb_to_grayscale(num_output_channels=3)`` where ``apply`` (B,) is true."""
    return _choose(images, rgb_to_grayscale(images), _per_sample(apply))


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
    return _choose(images, 1 - images, _per_sample(apply) & (images >= threshold))


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(image - mean) / std per channel."""
    mean_t = _constant(tuple(mean), images.device, images.dtype).view(1, -1, 1, 1)
    std_t = _constant(tuple(std), images.device, images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t
