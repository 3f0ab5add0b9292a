"""View pipelines: uint8 image batches in, augmented float views out, all on the images' device."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslkit.augment import ops
from sslkit.augment.extra import ExtraAugment
from sslkit.config import AugmentConfig


def _coin(batch: int, prob: float | Tensor, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """(B,) bool, each true with probability ``prob`` (a float, or one per sample)."""
    return torch.rand(batch, generator=generator, device=device) < prob


def _per_view(probs: Sequence[float], n: int, views: int, device: torch.device) -> float | Tensor:
    """The probability of each of n image-major rows of ``views`` views: a float when all
    views share it, else (n,) (a cached constant: no host-to-device copy per call)."""
    if len(set(probs)) == 1:
        return probs[0]
    return ops._constant(tuple(probs), device, torch.float32).repeat(n // views)


def _uniform(
    batch: int, low: float, high: float, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """(B,) floats uniform in [low, high]."""
    return low + (high - low) * torch.rand(batch, generator=generator, device=device)


def _jitter_factor(
    apply: Tensor, strength: float, generator: torch.Generator | None, centre: float = 1.0
) -> Tensor:
    """(B,) factors uniform in [centre - s, centre + s] where ``apply`` (B,) is true, else the
    identity ``centre``; multiplicative factors (centre 1) start at 0 at the least, as torchvision."""
    low = -strength if centre == 0 else max(0.0, centre - strength)
    factor = _uniform(apply.shape[0], low, centre + strength, generator, apply.device)
    return torch.where(apply, factor, centre)


def default_blur_kernel(size: int) -> int:
    """An odd kernel side of about a tenth of the view: 23 at 224 px (SimCLR's), 9 at 96 px, and
    at least 3, so that a blur still blurs small views."""
    return max(3, 2 * (size // 20) + 1)


class ViewPipeline(nn.Module):
    """One random view per image, for a whole batch at once.

    uint8 (B, C, H, W), C = 1 or 3 -> float32 (B, 3, size, size): random resized crop and
    horizontal flip (one resampling), colour jitter, random grayscale, Gaussian blur,
    solarisation, normalisation. Each sample draws its own parameters.

    Colour jitter applies brightness, contrast, saturation, hue in this fixed order (torchvision's
    ColorJitter shuffles the order per call), each factor uniform in [1 - s, 1 + s] (hue in
    [-h, h]), to a sample with probability ``jitter_prob``. Values are clamped to [0, 1] after each
    colour op, as torchvision does.

    ``overrides`` replace fields of ``cfg`` for this view only (e.g. ``blur_prob=1.0``, or
    ``size`` and ``scale`` for a multi-crop local view). Solarisation uses threshold 0.5
    (BYOL's). ``normalize=False`` returns the views in [0, 1].
    """

    def __init__(self, cfg: AugmentConfig, normalize: bool = True, **overrides: object) -> None:
        super().__init__()
        self.cfg = type(cfg).model_validate({**cfg.model_dump(), **overrides})  # checked as the recipe's
        self.normalize = normalize
        self.blur_kernel = self.cfg.blur_kernel or default_blur_kernel(self.cfg.size)

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1),
        sizes: Tensor | None = None,
    ) -> Tensor:
        """images: uint8 (B, C, H, W); generator: on the images' device (None: torch's default).

        ``shard = (rank, world_size)``: the parameters are drawn for the global batch of
        world_size x B images and this process applies rows rank x B to (rank + 1) x B, so a
        step's views do not depend on how its global batch is split over processes.
        ``sizes``: see ``raw_views``.
        """
        return self.several(images, [(self.cfg.blur_prob, self.cfg.solarize_prob)], generator, shard, sizes)[0]

    def batch_key(self) -> tuple[AugmentConfig, int, bool]:
        """Pipelines with equal keys differ at most in their blur and solarisation probabilities,
        so that ``several`` makes their views in one call."""
        return self.cfg.model_copy(update={"blur_prob": 0.0, "solarize_prob": 0.0}), self.blur_kernel, self.normalize

    def several(
        self, images: Tensor, probs: Sequence[tuple[float, float]], generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1), sizes: Tensor | None = None,
    ) -> list[Tensor]:
        """V views of each image in one call, view v blurred with probability ``probs[v][0]`` and
        solarised with ``probs[v][1]``, otherwise as ``forward``: V float32 (B, 3, S, S)."""
        return self.finish(self.raw_views(images.float(), probs, generator, shard, sizes))

    def raw_views(
        self, source: Tensor, probs: Sequence[tuple[float, float]], generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1), sizes: Tensor | None = None,
    ) -> Tensor:
        """``several``'s views before normalisation: float (B, C, H, W) in [0, 255] -> (B, V, 3, S, S) in [0, 1].

        ``source`` is the uint8 batch converted to float once (``MultiView`` converts it once for
        all its pipelines). The parameters are drawn for image-major rows (image j's views in
        rows j * V to j * V + V - 1) of the global batch, so that a process's rows are still
        its slice of the global batch's draws (``shard``); all V crops of an image are sampled
        from the one source image in a single resampling, without V copies of it.

        ``sizes``: (B, 2) int (height, width) of each image before it was resized whole to the
        source's square (image files, see ``sslkit.data.image_folder``): crops are then drawn over
        each image's own extent and aspect, as torchvision's RandomResizedCrop on the file's
        image; None: the source is the image.
        """
        cfg = self.cfg
        views = len(probs)
        batch = source.shape[0]
        device = source.device
        rank, world_size = shard
        n, rows = batch * views * world_size, slice(rank * batch * views, (rank + 1) * batch * views)  # draws, ours
        blur_prob, solarize_prob = (_per_view(p, n, views, device) for p in zip(*probs))  # (n,) or float each

        if sizes is None:  # every image fills the source
            boxes = ops.sample_crop_boxes(n, *source.shape[-2:], cfg.scale, cfg.ratio, generator, device, rows=rows)
        else:  # image-major rows: each image's V crops over its own extent, mapped onto its resized source
            own = sizes.to(device).repeat_interleave(views, 0)  # (B * V, 2)
            boxes = ops.sample_crop_boxes(n, own[:, 0], own[:, 1], cfg.scale, cfg.ratio, generator, device, rows=rows)
            boxes = ops.image_boxes(boxes, own, tuple(source.shape[-2:]))
        flip = _coin(n, cfg.hflip_prob, generator, device)[rows]  # (B * V,)
        # crop a single grey channel before expanding it: 3x less resampling
        crops = ops.resized_crop_flip(source, boxes.view(batch, views, 4), flip.view(batch, views), cfg.size)
        crops = crops.expand(-1, -1, 3, -1, -1)  # (B, V, 3, S, S) in [0, 255], strided
        # [0, 255] -> [0, 1], riding on the brightness multiply when jittering, written into
        # image-major rows: the strided crops become contiguous in this pass, with no copy of their own
        x = torch.empty((batch, views, 3, cfg.size, cfg.size), device=device, dtype=source.dtype)
        if cfg.jitter_prob > 0:
            brightness, adjustments = self._jitter_factors(generator, n, rows, device)
            ops.adjust_brightness(crops, brightness.view(batch, views) / 255, out=x)
        else:
            adjustments = []
            torch.div(crops, 255, out=x)
        del crops  # freed before the colour ops, which need several tensors of its size at once
        x = x.flatten(0, 1)  # (B * V, 3, S, S) in [0, 1]
        for adjust, factor in adjustments:
            x = adjust(x, factor)
        if cfg.gray_prob > 0:
            x = ops.random_grayscale(x, _coin(n, cfg.gray_prob, generator, device)[rows])
        if any(p > 0 for p, _ in probs):
            blur = _coin(n, blur_prob, generator, device)[rows]
            sigma = _uniform(n, cfg.blur_sigma[0], cfg.blur_sigma[1], generator, device)[rows]
            x = ops.gaussian_blur(x, sigma, self.blur_kernel, blur)
        if any(p > 0 for _, p in probs):
            x = ops.solarize(x, 0.5, _coin(n, solarize_prob, generator, device)[rows])
        return x.unflatten(0, (batch, views))

    def finish(self, views: Tensor) -> list[Tensor]:
        """``raw_views``' (B, V, 3, S, S) in [0, 1] -> V (B, 3, S, S), normalised unless ``normalize=False``."""
        if self.normalize:
            views = ops.normalize(views, self.cfg.mean, self.cfg.std)
        return list(views.unbind(1))

    def _jitter_factors(
        self, generator: torch.Generator | None, n: int, rows: slice, device: torch.device
    ) -> tuple[Tensor, list[tuple[Callable[[Tensor, Tensor], Tensor], Tensor]]]:
        """Colour jitter's brightness factors (B,), and its contrast, saturation and hue ops
        with their factors (B,) each, in the order they apply; drawn for n samples, ``rows`` used."""
        cfg = self.cfg
        jitter = _coin(n, cfg.jitter_prob, generator, device)
        brightness = _jitter_factor(jitter, cfg.brightness, generator)[rows]
        adjustments = []
        for adjust, strength, centre in ((ops.adjust_contrast, cfg.contrast, 1.0),
                                         (ops.adjust_saturation, cfg.saturation, 1.0),
                                         (ops.adjust_hue, cfg.hue, 0.0)):
            if strength > 0:
                adjustments.append((adjust, _jitter_factor(jitter, strength, generator, centre)[rows]))
        return brightness, adjustments


class MultiView(nn.Module):
    """Several views of each image: one per pipeline, e.g. SimCLR's two, or DINO's two global
    and N local crops (views of different sizes, in pipeline order).

    Consecutive pipelines that differ at most in blur and solarisation probability (SimCLR's
    and BYOL's two views, DINO's two global and its N local views) run as one call
    (``ViewPipeline.raw_views``): one set of kernel launches instead of one per view, and
    the uint8 batch is converted to float once for all of them.

    ``extra``: kornia augmentation modules applied in order to every view, after the
    pipelines' ops and before normalisation, with parameters drawn from the views' generator
    (see ``sslkit.augment.extra``). For example, kornia's ``RandomSharpness`` on 30 % of the views:

    Example:
        >>> import kornia
        >>> from sslkit.config import AugmentConfig
        >>> cfg = AugmentConfig(size=16)
        >>> views = MultiView([ViewPipeline(cfg), ViewPipeline(cfg)],
        ...                   extra=[kornia.augmentation.RandomSharpness(0.5, p=0.3)])
        >>> images = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
        >>> [tuple(v.shape) for v in views(images, torch.Generator().manual_seed(0))]
        [(4, 3, 16, 16), (4, 3, 16, 16)]
    """

    def __init__(self, pipelines: Sequence[ViewPipeline], extra: Sequence[nn.Module] = ()) -> None:
        super().__init__()
        self.pipelines = nn.ModuleList(pipelines)
        self.extra = ExtraAugment(extra)
        self.runs: list[list[ViewPipeline]] = []  # consecutive pipelines of one batch_key
        for pipeline in pipelines:
            if self.runs and self.runs[-1][0].batch_key() == pipeline.batch_key():
                self.runs[-1].append(pipeline)
            else:
                self.runs.append([pipeline])

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None, shard: tuple[int, int] = (0, 1),
        sizes: Tensor | None = None,
    ) -> list[Tensor]:
        """images: uint8 (B, C, H, W) -> one float32 (B, 3, size_v, size_v) per pipeline v (``shard``,
        ``sizes``: see ViewPipeline)."""
        source = images.float()  # (B, C, H, W) in [0, 255]
        views: list[Tensor] = []
        for run in self.runs:
            probs = [(p.cfg.blur_prob, p.cfg.solarize_prob) for p in run]
            x = run[0].raw_views(source, probs, generator, shard, sizes)  # (B, V, 3, S, S) in [0, 1]
            if self.extra:
                x = self.extra(x.flatten(0, 1), generator, shard).unflatten(0, x.shape[:2])
            views += run[0].finish(x)
        return views


def eval_transform(
    images: Tensor, size: int, mean: Sequence[float], std: Sequence[float], sizes: Tensor | None = None
) -> Tensor:
    """The clean path for evaluation features: uint8 (B, C, H, W) -> normalised float32 (B, 3, size, size).

    ``sizes``: (B, 2) (height, width) of each image before it was resized whole to the batch's
    square (image files): the centred square of each image (shorter side) is cut out first, at
    the batch's resolution, as Resize + CenterCrop would. Then resizes (bilinear, antialiased)
    only when the images are not already ``size`` x ``size``.
    """
    x = images.float() / 255  # (B, C, H, W)
    if sizes is not None:
        canvas = tuple(x.shape[-2:])
        boxes = ops.centre_square_boxes(sizes.to(x.device), canvas)  # (B, 4)
        x = ops.resized_crop_flip(x, boxes, torch.zeros(len(x), dtype=torch.bool, device=x.device), canvas)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return ops.normalize(x.expand(-1, 3, -1, -1), mean, std)
