"""sslkit.augment: fused batch ops against torchvision/kornia, probabilities, crop boxes, seeding."""

from __future__ import annotations

import math

import kornia
import kornia.augmentation as K
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch.profiler import ProfilerActivity, profile
from torchvision.transforms import RandomResizedCrop

from sslkit.augment import (
    augment_config,
    PRESETS,
    MultiView,
    ViewPipeline,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    create_augment,
    eval_transform,
    gaussian_blur,
    normalize,
    random_grayscale,
    resized_crop_flip,
    sample_crop_boxes,
    solarize,
)
from sslkit.config import AugmentConfig, load_config
from sslkit.errors import UserError

# no augmentation at all: identity crop, no flip, no colour change
PLAIN = dict(
    scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_prob=0.0, jitter_prob=0.0, gray_prob=0.0, blur_prob=0.0
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _uint8(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=_gen(seed))


def _float(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=_gen(seed))


def _within_binomial(count: int, n: int, p: float) -> bool:
    """count/n is p exactly at p = 0 or 1, else within 4 standard deviations of p."""
    if p in (0.0, 1.0):
        return count == n * p
    return abs(count / n - p) <= 4 * math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------- pipeline output


@pytest.mark.parametrize("channels", [1, 3])
def test_pipeline_shape_dtype_range(channels: int) -> None:
    images = _uint8(16, channels, 40, 36)
    cfg = AugmentConfig(size=24, blur_prob=0.5)
    raw = ViewPipeline(cfg, normalize=False, solarize_prob=0.5)(images, _gen(1))
    assert raw.shape == (16, 3, 24, 24) and raw.dtype == torch.float32
    assert raw.min() >= 0 and raw.max() <= 1
    views = create_augment(cfg)(images, _gen(1))
    assert len(views) == 2
    for view in views:
        assert view.shape == (16, 3, 24, 24) and view.dtype == torch.float32
        assert view.min() < 0  # normalised: the mean is subtracted


def test_grayscale_input_stays_gray() -> None:
    # every colour op maps r = g = b to r = g = b, so an expanded grey image stays grey
    images = _uint8(32, 1, 20, 20)
    views = ViewPipeline(AugmentConfig(size=16, blur_prob=0.5), normalize=False)(images, _gen(0))
    assert torch.allclose(views[:, 0], views[:, 1], atol=1e-5)
    assert torch.allclose(views[:, 1], views[:, 2], atol=1e-5)


def test_plain_pipeline_is_conversion_and_normalisation() -> None:
    images = _uint8(8, 3, 16, 16)
    cfg = AugmentConfig(size=16, **PLAIN)
    expected = TF.normalize(images.float() / 255, list(cfg.mean), list(cfg.std))
    torch.testing.assert_close(ViewPipeline(cfg)(images, _gen(0)), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- crop boxes


def test_crop_boxes_inside_image_and_within_scale_and_ratio() -> None:
    height, width, scale, ratio = 60, 80, (0.2, 0.9), (0.6, 1.5)
    boxes = sample_crop_boxes(4000, height, width, scale, ratio, _gen(0))
    x0, y0, w, h = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round())
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= width).all() and (y0 + h <= height).all()
    # sides are rounded to whole pixels: allow half a pixel on each side
    area = w * h / (height * width)
    assert area.min() >= scale[0] * 0.9 and area.max() <= scale[1] * 1.1
    assert (w / (h + 0.5)).min() >= ratio[0] * 0.95 and ((w + 0.5) / h).max() <= ratio[1] * 1.05


def test_crop_positions_uniform_over_valid_offsets() -> None:
    # a small image has few valid offsets per box, so missing the last one shows in the mean
    height, width, n = 12, 16, 4000
    x0, y0, w, h = sample_crop_boxes(n, height, width, generator=_gen(0)).unbind(1)
    for start, side, full in ((x0, w, width), (y0, h, height)):
        position = ((start + 0.5) / (full - side + 1))[side < full]  # uniform in (0, 1)
        assert abs(position.mean() - 0.5) < 4 * math.sqrt(1 / 12 / len(position))


def test_crop_boxes_match_torchvision_distribution() -> None:
    height, width, n = 50, 70, 4000
    boxes = sample_crop_boxes(n, height, width, generator=_gen(0))
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    ref = torch.tensor([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    ref_h, ref_w = ref[:, 2].float(), ref[:, 3].float()
    w, h = boxes[:, 2], boxes[:, 3]
    ours = {"area": w * h / (height * width), "log_ratio": (w / h).log()}
    theirs = {"area": ref_w * ref_h / (height * width), "log_ratio": (ref_w / ref_h).log()}
    for key in ours:
        standard_error = math.sqrt((ours[key].var() + theirs[key].var()) / n)
        assert abs(ours[key].mean() - theirs[key].mean()) < 5 * standard_error, key


@pytest.mark.parametrize("height, width", [(10, 200), (200, 10)])
def test_crop_boxes_fall_back_to_torchvision_centre_crop(height: int, width: int) -> None:
    # a thin strip cannot hold 90 % of its area at an aspect ratio within [3/4, 4/3]
    scale, ratio = (0.9, 1.0), (3 / 4, 4 / 3)
    boxes = sample_crop_boxes(8, height, width, scale, ratio, _gen(0))
    top, left, h, w = RandomResizedCrop.get_params(torch.zeros(1, height, width), list(scale), list(ratio))
    assert torch.equal(boxes, torch.tensor([[left, top, w, h]] * 8, dtype=boxes.dtype))


# ---------------------------------------------------------------- fused ops vs references


@pytest.mark.parametrize("size", [16, 8])  # upscaled and downscaled crops
def test_resized_crop_flip_matches_torchvision(size: int) -> None:
    images = _float(12, 3, 24, 20)
    boxes = sample_crop_boxes(12, 24, 20, (0.3, 1.0), generator=_gen(1))
    flip = torch.arange(12) % 2 == 0
    out = resized_crop_flip(images, boxes, flip, size)
    assert out.shape == (12, 3, size, size)
    for i, (x0, y0, w, h) in enumerate(boxes.int().tolist()):
        ref = TF.resized_crop(images[i], y0, x0, h, w, [size, size], antialias=False)
        ref = TF.horizontal_flip(ref) if flip[i] else ref
        # the outermost output pixels of an upscaled crop blend in the pixel beyond the box edge
        torch.testing.assert_close(out[i, :, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_resized_crop_flip_whole_image_matches_resize_including_border() -> None:
    images = _float(2, 3, 12, 10)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 12.0]] * 2)
    out = resized_crop_flip(images, boxes, torch.tensor([False, True]), (30, 25))
    ref = TF.resize(images, [30, 25], antialias=False)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], TF.horizontal_flip(ref[1]), atol=1e-5, rtol=0)


def test_resized_crop_flip_several_crops_per_image_equal_one_crop_per_row() -> None:
    """(B, V, 4) boxes: the V crops of each image from the one image equal crops of the image
    repeated V times, and come back as (B, V, C, S, S)."""
    images = _float(5, 3, 24, 20)
    boxes = sample_crop_boxes(5 * 4, 24, 20, (0.1, 1.0), generator=_gen(1))  # (B * V, 4), image-major
    flip = torch.arange(5 * 4) % 3 == 0
    several = resized_crop_flip(images, boxes.view(5, 4, 4), flip.view(5, 4), 12)
    one_per_row = resized_crop_flip(images.repeat_interleave(4, 0), boxes, flip, 12)
    assert several.shape == (5, 4, 3, 12, 12)
    torch.testing.assert_close(several.flatten(0, 1), one_per_row, atol=1e-6, rtol=0)


def _largest_allocation(fn) -> int:
    """Bytes of the largest allocation one op makes (with its children) while ``fn()`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(event.cpu_memory_usage for event in prof.events())


def test_multicrop_converts_the_source_once_and_never_copies_it_per_view() -> None:
    """Six local views of 8 px from 64 px images: no op allocates more than the float source
    (staging its V copies, as views were made before, allocates six times as much)."""
    images = _uint8(8, 3, 64, 64)
    views = create_augment(augment_config("multicrop", size=16, local_crops=6, local_size=8))
    assert _largest_allocation(lambda: views(images, _gen(0))) <= images.numel() * 4


def _per_sample_reference(fn, images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return torch.stack([fn(image, float(f)) for image, f in zip(images, factors)])


@pytest.mark.parametrize(
    "op, reference, low, high, atol",
    [
        (adjust_brightness, TF.adjust_brightness, 0.5, 1.5, 1e-6),
        # torchvision's luma weight for red is 0.2989, ours (and kornia's) 0.299
        (adjust_contrast, TF.adjust_contrast, 0.5, 1.5, 1e-3),
        (adjust_saturation, TF.adjust_saturation, 0.0, 2.0, 1e-3),
        (adjust_hue, TF.adjust_hue, -0.5, 0.5, 1e-5),
    ],
)
def test_colour_op_matches_torchvision(op, reference, low: float, high: float, atol: float) -> None:
    images = _float(16, 3, 12, 12)
    factors = low + (high - low) * _float(16, seed=1)
    expected = _per_sample_reference(reference, images, factors)
    torch.testing.assert_close(op(images, factors), expected, atol=atol, rtol=0)


def test_hue_matches_kornia() -> None:
    images = _float(16, 3, 12, 12)
    images[0, :, :2] = 0.5  # grey pixels, whose hue is undefined
    factors = _float(16, seed=1) - 0.5
    expected = kornia.enhance.adjust_hue(images, 2 * math.pi * factors)
    torch.testing.assert_close(adjust_hue(images, factors), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(adjust_hue(images, torch.zeros(16)), images, atol=1e-5, rtol=0)


def test_random_grayscale_matches_torchvision() -> None:
    images = _float(8, 3, 10, 10)
    apply = torch.tensor([True, False] * 4)
    out = random_grayscale(images, apply)
    gray = TF.rgb_to_grayscale(images, num_output_channels=3)
    torch.testing.assert_close(out[apply], gray[apply], atol=1e-3, rtol=0)
    assert torch.equal(out[~apply], images[~apply])


def test_gaussian_blur_matches_kornia() -> None:
    images = _float(8, 3, 16, 12)
    sigma = 0.1 + 1.9 * _float(8, seed=1)
    apply = torch.tensor([True, True, False, True] * 2)
    out = gaussian_blur(images, sigma, 5, apply)
    expected = kornia.filters.gaussian_blur2d(images, 5, sigma[:, None].expand(8, 2), border_type="reflect")
    torch.testing.assert_close(out[apply], expected[apply], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[~apply], images[~apply], atol=1e-6, rtol=0)


def test_solarize_and_normalize_match_torchvision() -> None:
    images = _float(6, 3, 8, 8)
    apply = torch.tensor([True, False, True, True, False, False])
    out = solarize(images, 0.4, apply)
    torch.testing.assert_close(out[apply], TF.solarize(images[apply], 0.4))
    assert torch.equal(out[~apply], images[~apply])
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    torch.testing.assert_close(normalize(images, mean, std), TF.normalize(images, list(mean), list(std)))


@pytest.mark.parametrize("height, width", [(32, 32), (40, 28)])
def test_eval_transform(height: int, width: int) -> None:
    images = _uint8(4, 1, height, width)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = eval_transform(images, 32, mean, std)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    ref = TF.resize(images.float() / 255, [32, 32], antialias=True)
    ref = TF.normalize(ref.expand(-1, 3, -1, -1), list(mean), list(std))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- probabilities


def _flipped(images: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return (out - images.float().flip(-1) / 255).abs().amax((1, 2, 3)) < 1e-5


def _gray(images: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return (out[:, :1] == out).all(1).flatten(1).all(1)


def _changed(images: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return (out - images.float() / 255).abs().amax((1, 2, 3)) > 1e-4


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(
    "field, detect, extra",
    [
        ("hflip_prob", _flipped, {}),
        ("gray_prob", _gray, {}),
        ("jitter_prob", _changed, {}),
        # sigma of at least 1 so that every blurred sample visibly changes
        ("blur_prob", _changed, {"blur_sigma": (1.0, 2.0), "blur_kernel": 3}),
    ],
)
def test_probabilities_respected(field: str, detect, extra: dict, p: float) -> None:
    n = 4000
    images = _uint8(n, 3, 8, 8)
    cfg = AugmentConfig(size=8, **{**PLAIN, field: p, **extra})
    out = ViewPipeline(cfg, normalize=False)(images, _gen(2))
    assert _within_binomial(int(detect(images, out).sum()), n, p)


@pytest.mark.parametrize("strength", [0.4, 1.5])
def test_brightness_factors_span_torchvision_range(strength: float) -> None:
    # dark images (at most 100/255) never clip at 2.5x, so out / in recovers each factor
    n = 2000
    images = 1 + _uint8(n, 3, 4, 4) % 100
    only_brightness = dict(jitter_prob=1.0, brightness=strength, contrast=0.0, saturation=0.0, hue=0.0)
    cfg = AugmentConfig(size=4, **{**PLAIN, **only_brightness})
    out = ViewPipeline(cfg, normalize=False)(images, _gen(3))
    factor = (out * 255 / images).flatten(1)
    assert torch.allclose(factor, factor[:, :1], atol=1e-4)  # one factor per image
    low, high = max(0.0, 1 - strength), 1 + strength
    assert (factor > 0).all() and factor.min() >= low - 1e-4 and factor.max() <= high + 1e-4
    assert factor.min() < low + 0.01 * high and factor.max() > high - 0.01 * high


# ---------------------------------------------------------------- seeding and presets


def test_same_seed_same_views_different_seed_different_views() -> None:
    images = _uint8(16, 3, 32, 32)
    views = create_augment(AugmentConfig(blur_prob=0.5))
    first, second = views(images, _gen(7)), views(images, _gen(7))
    other = views(images, _gen(8))
    for a, b, c in zip(first, second, other):
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)
    assert not torch.allclose(first[0], first[1])  # the two views of a batch differ


@pytest.mark.parametrize("preset", ["simclr", "byol", "multicrop"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_views_equal_the_global_batch(world_size: int, preset: str) -> None:
    """Each process's views of its rows equal the rows of the one-process views of the whole batch
    (multicrop: also for its local views, made in one call on the repeated batch)."""
    images = _uint8(8 * world_size, 3, 32, 32)
    local = {"local_crops": 3, "local_size": 16} if preset == "multicrop" else {}
    views = create_augment(augment_config(preset=preset, blur_prob=0.5, hue=0.1, **local))
    whole = views(images, _gen(3))
    for rank, part in enumerate(images.chunk(world_size)):
        mine = views(part, _gen(3), (rank, world_size))
        for w, m in zip(whole, mine):
            assert torch.allclose(w[rank * 8 : (rank + 1) * 8], m, atol=1e-6)
    assert not torch.allclose(views(images[:8], _gen(3))[0], whole[0][:8])  # shard matters


def test_several_views_in_one_call_keep_their_own_probabilities() -> None:
    """View 0 always blurred and never solarised, view 1 the other way round, in one call."""
    cfg = AugmentConfig(size=16, jitter_prob=0.0, gray_prob=0.0, blur_sigma=(2.0, 2.0))
    pipeline = ViewPipeline(cfg, normalize=False)
    images = _uint8(8, 3, 20, 20)
    blurred, solarised = pipeline.several(images, [(1.0, 0.0), (0.0, 1.0)], _gen(1))
    plain, solarised_again = pipeline.several(images, [(0.0, 0.0), (0.0, 1.0)], _gen(1))
    assert torch.equal(solarised, solarised_again)  # the same crops, no blur on view 1
    assert solarised.max() <= 0.5 < blurred.max()  # solarising inverts every value above 0.5
    assert not torch.allclose(blurred, plain)
    # a blur smooths: neighbouring pixels differ less
    assert (blurred.diff(dim=-1).abs().mean() < 0.5 * plain.diff(dim=-1).abs().mean())
    assert len(create_augment(augment_config(preset="byol")).runs) == 1  # BYOL's two views: one call


def test_presets_and_overrides() -> None:
    assert "simclr" in PRESETS
    views = create_augment(AugmentConfig())
    assert isinstance(views, MultiView) and len(views.pipelines) == 2
    with pytest.raises(UserError, match="did you mean 'simclr'"):
        create_augment(augment_config(preset="simclrr"))
    cfg = AugmentConfig()
    pipeline = ViewPipeline(cfg, blur_prob=1.0)
    assert pipeline.cfg.blur_prob == 1.0 and cfg.blur_prob == 0.0
    with pytest.raises(ValueError, match="blur_probb"):  # pydantic's ValidationError
        ViewPipeline(cfg, blur_probb=1.0)
    with pytest.raises(ValueError, match="blur_prob"):
        ViewPipeline(cfg, blur_prob=1.5)


# ---------------------------------------------------------------- kornia extras

SHARPEN = {"name": "RandomSharpness", "sharpness": (1.5, 2.0)}  # factors above 1 sharpen every pixel inside


def _extra_cfg(*extra: dict, **fields) -> AugmentConfig:
    preset = fields.pop("preset", "multicrop")
    local = {"local_crops": 3, "local_size": 8} if preset == "multicrop" else {}
    return augment_config(preset, **{"size": 16, "blur_prob": 0.5, **local, **fields, "extra": extra})


def _assert_all_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_extra_at_p1_changes_every_view_and_at_p0_none() -> None:
    images = _uint8(8, 3, 24, 24)
    plain = create_augment(_extra_cfg())(images, _gen(3))
    changed = create_augment(_extra_cfg({**SHARPEN, "p": 1.0}))(images, _gen(3))
    for a, b in zip(plain, changed):
        assert (a - b).abs().flatten(1).amax(1).min() > 1e-3  # every view of every image
    unchanged = create_augment(_extra_cfg({**SHARPEN, "p": 0.0}))(images, _gen(3))
    _assert_all_equal(unchanged, plain)  # bitwise: the extras draw nothing from the views' generator


def test_extra_applies_before_normalisation() -> None:
    """kornia sees [0, 1] images: inverting them (1 - x) and then normalising is what comes out."""
    images = _uint8(4, 3, 16, 16)
    cfg = _extra_cfg({"name": "RandomInvert", "p": 1.0}, preset="simclr")
    raw = ViewPipeline(cfg, normalize=False)
    expected = normalize(1 - raw.several(images, [(cfg.blur_prob, cfg.solarize_prob)] * 2, _gen(1))[1],
                         cfg.mean, cfg.std)
    torch.testing.assert_close(create_augment(cfg)(images, _gen(1))[1], expected)


def test_extra_same_seed_same_views_and_a_resumed_generator_continues_alike() -> None:
    images = _uint8(8, 3, 24, 24)
    views = create_augment(_extra_cfg({**SHARPEN, "p": 0.5}, {"name": "RandomGaussianNoise", "std": 0.1, "p": 0.5}))
    generator = _gen(4)
    first = views(images, generator)
    saved = generator.get_state()  # what a checkpoint holds
    second = views(images, generator)
    resumed = torch.Generator()
    resumed.set_state(saved)
    _assert_all_equal(views(images, resumed), second)
    _assert_all_equal(views(images, _gen(4)), first)
    assert not torch.allclose(first[0], second[0])  # the next step draws anew
    rng = torch.get_rng_state()
    views(images, _gen(4))
    assert torch.equal(torch.get_rng_state(), rng)  # torch's global RNG is left as it was


@pytest.mark.parametrize("preset, extra", [
    ("simclr", ({**SHARPEN, "p": 0.5}, {"name": "RandomAffine", "degrees": 20.0, "p": 0.5})),
    # one view of 4 images: a global batch of 4 rows, which ColorJitter's per-call ``order`` (a
    # permutation of its 4 ops) also has; it must not be split between the processes
    ("single", ({"name": "ColorJitter", "brightness": 0.3, "contrast": 0.3, "hue": 0.1, "p": 0.5},)),
])
def test_extra_sharded_views_equal_the_global_batch(preset: str, extra: tuple[dict, ...]) -> None:
    """Two processes' rows, concatenated, equal the one-process views (2 images per process)."""
    images = _uint8(4, 3, 16, 16)
    views = create_augment(_extra_cfg(*extra, preset=preset))
    whole = views(images, _gen(5))
    parts = [views(part, _gen(5), (rank, 2)) for rank, part in enumerate(images.chunk(2))]
    for v, view in enumerate(whole):
        assert torch.equal(torch.cat([part[v] for part in parts]), view)
    # the shard matters: drawn for 2 images only, the first process's views would differ
    assert not torch.equal(views(images[:2], _gen(5))[0], whole[0][:2])


def test_extra_modules_from_python_and_from_the_config_are_the_same() -> None:
    images = _uint8(6, 3, 20, 20)
    from_config = create_augment(_extra_cfg({**SHARPEN, "p": 0.5}))(images, _gen(6))
    modules = [K.RandomSharpness(sharpness=(1.5, 2.0), p=0.5)]
    _assert_all_equal(create_augment(_extra_cfg(), extra=modules)(images, _gen(6)), from_config)
    views = create_augment(_extra_cfg())
    _assert_all_equal(MultiView(views.pipelines, extra=modules)(images, _gen(6)), from_config)
    with pytest.raises(TypeError, match="AugmentationBase2D"):
        MultiView(views.pipelines, extra=[torch.nn.Identity()])


def test_extra_from_a_recipe_override() -> None:
    cfg = load_config(None, ["augment.extra=[{name: RandomSharpness, sharpness: 0.5, p: 0.3}]"])
    assert cfg.augment.extra == ({"name": "RandomSharpness", "sharpness": 0.5, "p": 0.3},)
    [module] = create_augment(cfg.augment).extra.augmentations
    assert isinstance(module, K.RandomSharpness) and module.p == 0.3


@pytest.mark.parametrize("extra, message", [
    ({"name": "RandomSharpnes", "p": 0.3}, r"^augment\.extra\[1\]\.name: 'RandomSharpnes' is not a per-image kornia "
                                          r"augmentation \(did you mean 'RandomSharpness'\?\)"),
    ({"name": "RandomSharpness", "sharpnes": 0.5}, r"^augment\.extra\[1\]: RandomSharpness\(sharpnes=0\.5\) failed: "
                                                  r"TypeError: .*sharpnes"),
    ({"sharpness": 0.5}, r"^augment\.extra\[1\]: expected a mapping with the name of a kornia augmentation"),
    ({"name": "RandomMixUpV2"}, r"^augment\.extra\[1\]\.name: 'RandomMixUpV2' is not a per-image kornia augmentation"),
])
def test_extra_bad_entries_are_one_line_user_errors(extra: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        create_augment(_extra_cfg({**SHARPEN, "p": 0.5}, extra))
    assert "\n" not in str(err.value)
