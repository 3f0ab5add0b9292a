"""``data.decode=device``: JPEG files decoded in the main process on the training device.

On the CPU the device decoder is libjpeg-turbo, as in the workers, so batches must equal
``data.decode=workers`` batches exactly; on CUDA (nvjpeg) they agree to a grey level or two.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torchvision.io as tio
from PIL import Image

from sslkit.config import ConfigError, DataConfig, load_config
from sslkit.data import ImageFolder, load_dataset, make_batches
from sslkit.data.image_folder import BadImageError, BadImageWarning, device_jpeg
from sslkit.errors import UserError

S = 16  # data.image_size here
pytestmark = [pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning"),
              pytest.mark.usefixtures("no_default_places")]


@pytest.fixture(autouse=True)
def full_size_jpeg_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device decodes JPEGs at full size, the workers large ones DCT-scaled (tested in
    test_data_sources.py): here the workers decode at full size too, to compare pixels."""
    from sslkit.data import image_folder

    monkeypatch.setattr(image_folder, "_reducible", lambda raw, side: False)


def folder_cfg(root: Path, **kw: Any) -> DataConfig:
    return DataConfig(name="image_folder", root=str(root), image_size=S, **kw)


def picture(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A smooth gradient with some noise: JPEG-like content, different per seed."""
    gen = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x + y) * 127 // max(width + height, 1)], -1)
    pixels = np.clip(base + gen.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def jpeg(width: int, height: int, seed: int, mode: str = "RGB", **kw: Any) -> bytes:
    out = io.BytesIO()
    picture(width, height, seed, mode).save(out, "JPEG", quality=90, **kw)
    return out.getvalue()


def encoded(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def bogus_huffman() -> bytes:
    """A whole JPEG (SOI ... EOI) whose Huffman table is damaged: it passes the workers' check
    and fails in the decoder, so the main process must find it within its batch."""
    data = bytearray(jpeg(24, 24, 99))
    at = data.index(b"\xff\xc4")
    data[at + 5 : at + 21] = b"\xff" * 16  # code counts that add up to far more than 256 codes
    return bytes(data)


def truncated() -> bytes:
    data = jpeg(24, 24, 98)
    return data[: len(data) // 2]  # no EOI marker: the workers decode it (and fail) as with decode=workers


# name: (bytes, decoded on the device?). Sorted by name within each class folder.
FILES: dict[str, tuple[Callable[[], bytes], bool]] = {
    "a/0.jpg": (lambda: jpeg(37, 23, 0), True),
    "a/1.jpg": (lambda: jpeg(64, 48, 1, progressive=True), True),
    "a/2.jpg": (lambda: jpeg(40, 30, 2, "L"), True),  # grayscale JPEG
    "a/3.png": (lambda: encoded(picture(30, 50, 3), "PNG"), False),
    "b/0.jpg": (lambda: jpeg(64, 48, 4), True),  # the size of a/1 and c/3: resized together
    "b/1.jpg": (lambda: jpeg(48, 64, 5, subsampling=0), True),  # 4:4:4
    "b/2.jpg": (lambda: jpeg(20, 20, 6, "CMYK"), False),  # CMYK: the workers decode it
    "b/3.webp": (lambda: encoded(picture(25, 25, 7), "WEBP", quality=90), False),
    "c/0.jpg": (lambda: jpeg(1, 1, 8), True),
    "c/1.jpg": (lambda: jpeg(100, 75, 9) + b"\0\0trailing", False),  # bytes after EOI: the workers
    "c/2.jpg": (lambda: jpeg(S, S, 10), True),  # already S x S
    "c/3.jpg": (lambda: jpeg(64, 48, 11), True),
}


def write_folder(root: Path, files: dict[str, Callable[[], bytes]]) -> list[Path]:
    paths = []
    for name, make in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make())
        paths.append(path)
    return paths


def epochs(batches: Any, n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for epoch in range(n):
        batches.set_epoch(epoch)
        out += [(images.cpu(), labels.cpu()) for images, labels in batches]
    return out


def assert_same_batches(got: list, want: list) -> None:
    assert len(got) == len(want)
    for (images, labels), (want_images, want_labels) in zip(got, want):
        assert images.dtype == torch.uint8 and images.shape == want_images.shape and images.is_contiguous()
        assert torch.equal(labels, want_labels)
        assert torch.equal(images, want_images)


# ---------------------------------------------------------------------------------------
# The same batches as decode=workers


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_device_decode_equals_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, channels: int, num_workers: int
) -> None:
    write_folder(tmp_path, {name: make for name, (make, _) in FILES.items()})
    on_device = sum(device for _, device in FILES.values())
    decoded: list[int] = []  # JPEGs per decode_jpegs call
    original = ImageFolder.decode_jpegs

    def spy(self: ImageFolder, jpegs: list, indices: list, device: Any) -> Any:
        decoded.append(len(jpegs))
        return original(self, jpegs, indices, device)

    monkeypatch.setattr(ImageFolder, "decode_jpegs", spy)
    want = load_dataset(folder_cfg(tmp_path, channels=channels), "train")
    data = load_dataset(folder_cfg(tmp_path, channels=channels, decode="device"), "train")
    assert data.decode == "device" and data.head(3).decode == "device"
    for shuffle in (True, False):
        kw = dict(shuffle=shuffle, drop_last=False, seed=3, num_workers=num_workers)
        reference = epochs(make_batches(want, 5, **kw))
        decoded.clear()
        got = epochs(make_batches(data, 5, **kw))
        assert_same_batches(got, reference)
        assert got[0][0].shape == (5, channels, S, S) and got[-1][0].shape == (2, channels, S, S)
        assert sum(decoded) == 2 * on_device and len(decoded) <= 6  # every device JPEG, at most one call a batch


def test_workers_check_which_files_go_to_the_device() -> None:
    for name, (make, device) in FILES.items():
        assert device_jpeg(np.frombuffer(make(), np.uint8)) == device, name
    good = jpeg(8, 8, 0)
    for data in (b"", good[:-2], truncated(), good[:2] + good[-2:], b"<html></html>", good + b"\0"):
        assert not device_jpeg(np.frombuffer(data, np.uint8))
    assert device_jpeg(np.frombuffer(bogus_huffman(), np.uint8))  # found by the decoder instead
    assert device_jpeg(np.frombuffer(jpeg(8, 8, 0, "L"), np.uint8))


def test_a_batch_of_good_jpegs_is_one_decoder_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_folder(tmp_path, {f"c/{i}.jpg": (lambda i=i: jpeg(30 + i, 20, i)) for i in range(6)})
    calls: list[int] = []
    original = tio.decode_jpeg

    def spy(input: Any, **kw: Any) -> Any:
        calls.append(len(input) if isinstance(input, list) else 1)
        return original(input, **kw)

    monkeypatch.setattr(tio, "decode_jpeg", spy)
    data = load_dataset(folder_cfg(tmp_path, decode="device"), "train")
    assert [len(labels) for _, labels in make_batches(data, 3, shuffle=False, drop_last=False, seed=0)] == [3, 3]
    assert calls == [3, 3]


# ---------------------------------------------------------------------------------------
# Bad files: as with decode=workers


BAD = {"bogus_huffman": bogus_huffman, "truncated": truncated, "zero_bytes": lambda: b""}


def good_files(n: int) -> dict[str, Callable[[], bytes]]:
    return {f"c{i:02d}/a.jpg": (lambda i=i: jpeg(20 + i, 18, i)) for i in range(n)}


@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_jpeg_is_an_error_naming_it(tmp_path: Path, kind: str, num_workers: int) -> None:
    paths = write_folder(tmp_path, good_files(5))
    paths[3].write_bytes(BAD[kind]())
    messages = []
    for decode in ("workers", "device"):
        data = load_dataset(folder_cfg(tmp_path, decode=decode), "train")
        batches = make_batches(data, 4, shuffle=False, drop_last=False, seed=0, num_workers=num_workers)
        with pytest.raises(BadImageError) as err:
            list(batches)
        messages.append(str(err.value))
        del err, batches  # the traceback holds the loader: free its workers now
    assert messages[0] == messages[1]
    assert messages[1].startswith(f"cannot decode image {paths[3]}: ") and "Remove or replace" in messages[1]
    assert "Traceback" not in messages[1] and "\n" not in messages[1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_replaces_and_counts_as_workers_do(tmp_path: Path, num_workers: int) -> None:
    paths = write_folder(tmp_path, good_files(12))
    paths[2].write_bytes(bogus_huffman())  # found by the device decoder
    paths[3].write_bytes(truncated())  # found by a worker: 2 and 3 both take 4's image
    paths[7].write_bytes(bogus_huffman())
    paths[11].write_bytes(b"")  # the last: replaced by the first (wraps around)
    bad = {str(paths[i]) for i in (2, 3, 7, 11)}
    runs = {}
    for decode in ("workers", "device"):
        data = load_dataset(folder_cfg(tmp_path, bad_images="skip", decode=decode), "train")
        batches = make_batches(data, 4, shuffle=True, drop_last=True, seed=1, num_workers=num_workers)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = epochs(batches)
        warned = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
        runs[decode] = got, batches.bad_images, warned
    (want, want_count, want_warned), (got, count, warned) = runs["workers"], runs["device"]
    assert_same_batches(got, want)
    assert count == want_count == 8  # 4 files, each drawn once per epoch
    assert sorted(warned) == sorted(want_warned) and len(warned) == 4  # once per file
    assert {path for path in bad if any(path in m for m in warned)} == bad
    labels = torch.cat([labels for _, labels in got])
    assert set(labels.tolist()) == set(range(12)) - {2, 3, 7, 11}


def test_skip_with_every_jpeg_bad_is_an_error(tmp_path: Path) -> None:
    paths = write_folder(tmp_path, good_files(3))
    for path in paths:
        path.write_bytes(bogus_huffman())
    data = load_dataset(folder_cfg(tmp_path, bad_images="skip", decode="device"), "train")
    with pytest.raises(BadImageError, match=rf"none of the 3 images under {tmp_path} can be decoded"):
        list(make_batches(data, 2, shuffle=False, drop_last=False, seed=0))


# ---------------------------------------------------------------------------------------
# The setting


def test_invalid_decode_value(tmp_path: Path) -> None:
    write_folder(tmp_path, good_files(2))
    with pytest.raises(ConfigError, match=r"data.decode='gpu': expected 'workers' or 'device'"):
        load_config(None, ["data.decode=gpu"])
    with pytest.raises(UserError, match=r"data.decode must be one of workers, device \(.*\), got 'Device'"):
        ImageFolder.scan(tmp_path, S, decode="Device")
    data = load_dataset(DataConfig(name="synthetic", decode="device"), "train")  # in memory: no files to decode
    assert len(data) > 0


def test_decode_is_a_config_key(tmp_path: Path) -> None:
    from sslkit.config import load_config

    write_folder(tmp_path, good_files(2))
    cfg = load_config(None, ["data.name=image_folder", f"data.root={tmp_path}", f"data.image_size={S}",
                             "data.decode=device"])
    data = load_dataset(cfg.data, "test")
    assert data.decode == "device" and load_dataset(folder_cfg(tmp_path), "test").decode == "workers"


# ---------------------------------------------------------------------------------------
# nvjpeg (runs on a GPU machine)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("channels", [3, 1])
def test_cuda_decode_matches_cpu(tmp_path: Path, channels: int) -> None:
    write_folder(tmp_path, {name: make for name, (make, _) in FILES.items()})
    want = load_dataset(folder_cfg(tmp_path, channels=channels), "train")
    data = load_dataset(folder_cfg(tmp_path, channels=channels, decode="device"), "train")
    kw = dict(shuffle=True, drop_last=False, seed=3, num_workers=2)
    reference = epochs(make_batches(want, 5, **kw))
    batches = make_batches(data, 5, device="cuda", **kw)
    got = []
    for epoch in range(2):
        batches.set_epoch(epoch)
        for images, labels in batches:
            assert images.device.type == "cuda" and labels.device.type == "cuda"
            got.append((images.cpu(), labels.cpu()))
    assert len(got) == len(reference)
    for (images, labels), (want_images, want_labels) in zip(got, reference):
        assert images.shape == want_images.shape and images.dtype == torch.uint8
        assert torch.equal(labels, want_labels)
        assert (images.float() - want_images.float()).abs().mean() < 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bad_jpeg_is_named_or_skipped(tmp_path: Path) -> None:
    paths = write_folder(tmp_path, good_files(6))
    data = bytearray(jpeg(24, 24, 97))
    at = data.index(b"\xff\xdb")  # drop the quantization table: no decoder can go on
    paths[4].write_bytes(bytes(data[:at] + data[at + 2 + int.from_bytes(data[at + 2 : at + 4], "big") :]))
    strict = load_dataset(folder_cfg(tmp_path, decode="device"), "train")
    with pytest.raises(BadImageError, match=f"cannot decode image {paths[4]}: "):
        list(make_batches(strict, 3, shuffle=False, drop_last=False, seed=0, device="cuda"))
    skipping = load_dataset(folder_cfg(tmp_path, decode="device", bad_images="skip"), "train")
    batches = make_batches(skipping, 3, shuffle=False, drop_last=False, seed=0, device="cuda")
    with pytest.warns(BadImageWarning, match=str(paths[4])):
        labels = torch.cat([labels.cpu() for _, labels in batches])
    assert labels.tolist() == [0, 1, 2, 3, 5, 5] and batches.bad_images == 1
