"""One RGB-to-gray conversion (ITU-R 601 luma, ``sslkit.augment.rgb_to_grayscale``) for float
and uint8 images, the datasets and every decoder: the same picture gives the same gray
whatever the format (PNG, JPEG, WebP) and decoder (Pillow, torchvision, the device path), and
a gray file's levels stay as they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.io as tio
import torchvision.transforms.v2.functional as TF
from PIL import Image

from sslkit.augment import rgb_to_grayscale
from sslkit.data import ImageFolder, match_channels
from sslkit.data.image_folder import decode_image_file

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def _pixels(seed: int = 0, height: int = 24, width: int = 20) -> np.ndarray:
    """(H, W, 3) uint8 noise, and one pixel whose luma is a tie (174.5), which Pillow's "L"
    rounds up and the float32 conversion down."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[0, 0] = (92, 224, 136)
    return pixels


def _write(path: Path, image: Image.Image, **kw) -> Path:
    image.save(path, **kw)
    return path


def _rgb(path: Path) -> torch.Tensor:
    return decode_image_file(str(path), 3)


def _gray(path: Path) -> torch.Tensor:
    return decode_image_file(str(path), 1)


# --- the conversion ---------------------------------------------------------------------------


def test_float_matches_torchvision():
    images = torch.rand(4, 3, 9, 7, generator=torch.Generator().manual_seed(0))
    gray = rgb_to_grayscale(images)
    assert gray.shape == (4, 1, 9, 7) and gray.dtype == torch.float32
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(images), atol=1e-3, rtol=0)  # 0.299 vs 0.2989
    assert rgb_to_grayscale(images.double()).dtype == torch.float64


def test_uint8_is_the_float_conversion_rounded_and_matches_torchvision():
    images = torch.from_numpy(_pixels()).permute(2, 0, 1)  # (3, H, W): no batch dimension
    gray = rgb_to_grayscale(images)
    assert gray.shape == (1, 24, 20) and gray.dtype == torch.uint8
    assert torch.equal(gray, rgb_to_grayscale(images.float()).round().to(torch.uint8))
    scaled = rgb_to_grayscale(images.float() / 255) * 255  # the float path on [0, 1] images
    assert (scaled - gray.float()).abs().max() <= 0.5 + 1e-4
    assert (TF.rgb_to_grayscale(images).int() - gray.int()).abs().max() <= 1  # torchvision truncates


def test_gray_stored_as_rgb_comes_back_exactly():
    levels = torch.arange(256, dtype=torch.uint8).view(1, 16, 16)
    assert torch.equal(rgb_to_grayscale(levels.expand(3, -1, -1)), levels)
    assert torch.equal(match_channels(levels, 3)[None], levels.expand(1, 3, 16, 16))
    floats = levels.float() / 255
    torch.testing.assert_close(rgb_to_grayscale(floats.expand(3, -1, -1)), floats, atol=1e-6, rtol=0)


def test_match_channels_is_the_conversion():
    images = torch.from_numpy(_pixels()).permute(2, 0, 1)[None]  # (1, 3, H, W)
    assert torch.equal(match_channels(images, 1), rgb_to_grayscale(images))


# --- the decoders ------------------------------------------------------------------------------


def test_rgb_picture_gives_one_gray_in_every_lossless_format_and_decoder(tmp_path: Path):
    picture = Image.fromarray(_pixels(), "RGB")
    png = _write(tmp_path / "a.png", picture)
    webp = _write(tmp_path / "a.webp", picture, lossless=True)
    rgb = torch.from_numpy(_pixels()).permute(2, 0, 1)
    want = rgb_to_grayscale(rgb)
    assert torch.equal(_rgb(png), rgb) and torch.equal(_rgb(webp), rgb)
    assert torch.equal(_gray(png), want)  # Pillow's decoder
    assert torch.equal(_gray(webp), want)  # torchvision's
    assert torch.equal(rgb_to_grayscale(tio.decode_png(tio.read_file(str(png)), tio.ImageReadMode.RGB)), want)
    # control: Pillow's own "L" (16-bit fixed point) rounds the tie the other way
    assert np.asarray(picture.convert("L"))[0, 0] == 175 and want[0, 0, 0] == 174


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lossy_gray_is_the_conversion_of_the_rgb_decode(tmp_path: Path, fmt: str):
    path = _write(tmp_path / f"a.{fmt.lower()}", Image.fromarray(_pixels(1, 40, 32), "RGB"), format=fmt, quality=90)
    assert torch.equal(_gray(path), rgb_to_grayscale(_rgb(path)))
    if fmt == "JPEG":  # control: libjpeg's gray (the Y channel) is not the luma of the RGB it decodes
        assert not torch.equal(tio.decode_jpeg(tio.read_file(str(path)), tio.ImageReadMode.GRAY), _gray(path))


def test_gray_picture_keeps_its_levels_in_every_format(tmp_path: Path):
    levels = np.random.default_rng(2).integers(0, 256, (24, 20), dtype=np.uint8)
    picture = Image.fromarray(levels, "L")
    want = torch.from_numpy(levels)[None]
    png = _write(tmp_path / "a.png", picture)
    webp = _write(tmp_path / "a.webp", picture, lossless=True)  # WebP has no gray: stored as R = G = B
    jpeg = _write(tmp_path / "a.jpg", picture, quality=90)  # one component
    for path in (png, webp):
        assert torch.equal(_gray(path), want)
        assert torch.equal(_rgb(path), want.expand(3, -1, -1))
    # a gray JPEG: its own decoded levels, bitwise, as libjpeg and Pillow give them
    native = tio.decode_jpeg(tio.read_file(str(jpeg)), tio.ImageReadMode.GRAY)
    assert native.shape == (1, 24, 20)
    assert torch.equal(_gray(jpeg), native)
    assert torch.equal(_gray(jpeg)[0], torch.from_numpy(np.array(Image.open(jpeg))))
    assert torch.equal(_rgb(jpeg), native.expand(3, -1, -1))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_device_decode_gives_the_workers_gray(tmp_path: Path, mode: str):
    """``data.decode=device`` (here on the CPU: libjpeg-turbo, as the workers) converts as ``load``."""
    (tmp_path / "c").mkdir()
    paths = [_write(tmp_path / "c" / f"{i}.jpg", Image.fromarray(_pixels(i, 32, 24), "RGB").convert(mode))
             for i in range(2)]
    folder = ImageFolder.scan(tmp_path, image_size=16, channels=1, decode="device")
    jpegs = [folder.read(i)[0] for i in range(len(paths))]
    images, sizes, fallbacks = folder.decode_jpegs(jpegs, [0, 1], "cpu")
    assert sizes == [(32, 24)] * 2  # (height, width)
    assert fallbacks == []
    for i, image in enumerate(images):
        assert image.shape == (1, 16, 16)
        assert torch.equal(image, folder.load(i)[0])
