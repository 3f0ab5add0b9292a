"""Bad input to sslkit.data: each test writes one kind of bad file (tiny, real formats) and
checks that it gives a clear error naming the file and the remedy, or, with
``data.bad_images=skip``, a counted and warned substitution that keeps batches full."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import warnings
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torchvision.io as tio
from PIL import Image

from sslkit.config import ConfigError, DataConfig, load_config
from sslkit.errors import UserError
from sslkit.data import ImageFolder, data_config, load_dataset, make_batches
from sslkit.data.image_folder import BadImageError, BadImageWarning
from tests.test_data import write_cifar, write_fashion_mnist, write_idx

S = 8  # data.image_size of every image folder here
# pytest.warns re-emits the warnings it did not match, past setup.cfg's torchvision.io filter.
pytestmark = [pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning"),
              pytest.mark.usefixtures("no_default_places")]


def folder_cfg(root: Path, **kw) -> DataConfig:
    return data_config("image_folder", root=str(root), image_size=S, **kw)


def fill(i: int) -> int:
    """The grey level of good image i (distinct, exact in PNG)."""
    return 10 + 20 * i


def write_numbered(root: Path, n: int) -> list[Path]:
    """Classes c00..c{n-1}, one uniform PNG each: image and label i, filled with fill(i)."""
    paths = []
    for i in range(n):
        (root / f"c{i:02d}").mkdir(parents=True)
        paths.append(root / f"c{i:02d}" / "a.png")
        tio.write_png(torch.full((3, S, S), fill(i), dtype=torch.uint8), str(paths[-1]))
    return paths


def noise(h: int = 16, w: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def pil_bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def raw_png(array: np.ndarray, color_type: int) -> bytes:
    """A PNG of 16-bit samples (Pillow cannot write 16-bit RGB); (H, W) or (H, W, 3) uint16."""
    h, w = array.shape[:2]
    rows = array.astype(">u2").reshape(h, -1).tobytes()
    stride = len(rows) // h
    scanlines = b"".join(b"\0" + rows[r * stride : (r + 1) * stride] for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


# ---------------------------------------------------------------------------------------
# Undecodable image files: an error naming the file and the remedy, or skipped and counted


def flipped_png() -> bytes:
    """A PNG with one byte of its pixel data changed: torchvision 0.29's libpng decoder
    crashes the process (SIGSEGV) on it, so a regression here kills the test run."""
    data = bytearray(tio.encode_png(noise()).numpy().tobytes())
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


BAD_FILES: dict[str, tuple[str, Callable[[], bytes], str]] = {
    # name: (file name, its bytes, what the message says is wrong)
    "truncated_jpeg": ("a.jpg", lambda: half(tio.encode_jpeg(noise()).numpy().tobytes()), "truncated"),
    "jpeg_missing_its_last_bytes": ("a.jpg", lambda: tio.encode_jpeg(noise()).numpy().tobytes()[:-2], "truncated"),
    "truncated_png": ("a.png", lambda: half(tio.encode_png(noise()).numpy().tobytes()), "truncated"),
    "corrupt_png_data": ("a.png", flipped_png, "broken data stream"),
    "truncated_webp": ("a.webp", lambda: half(pil_bytes(Image.new("RGB", (16, 16), "red"), "WEBP")), "webp"),
    "zero_bytes": ("a.jpg", lambda: b"", "empty"),
    "text_named_jpg": ("a.jpg", lambda: b"<html>404 Not Found</html>\n", "not a JPEG, PNG or WebP"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_undecodable_file_is_an_error_or_skipped(tmp_path: Path, kind: str) -> None:
    name, make, what = BAD_FILES[kind]
    paths = write_numbered(tmp_path, 3)
    paths[1].unlink()
    bad = paths[1].with_name(name)
    bad.write_bytes(make())

    data = load_dataset(folder_cfg(tmp_path), "train")  # data.bad_images=error, the default
    with pytest.raises(BadImageError) as err:
        data[1]
    message = str(err.value)
    assert isinstance(err.value, UserError)  # the CLI prints a UserError as one `sslkit: error:` line
    assert str(bad) in message and what.lower() in message.lower()
    assert "Remove or replace this file" in message and "data.bad_images=skip" in message
    assert torch.equal(data[2][0], torch.full((3, S, S), fill(2), dtype=torch.uint8))  # the others still decode

    skipping = load_dataset(folder_cfg(tmp_path, bad_images="skip"), "train")
    with pytest.warns(BadImageWarning, match=str(bad)):
        image, label = skipping[1]
    assert label == 2 and torch.equal(image, torch.full((3, S, S), fill(2), dtype=torch.uint8))


def test_file_removed_after_the_scan_is_an_error(tmp_path: Path) -> None:
    paths = write_numbered(tmp_path, 2)
    data = load_dataset(folder_cfg(tmp_path), "train")
    paths[0].unlink()
    with pytest.raises(BadImageError, match=f"{paths[0]}: No such file.*Remove or replace"):
        data[0]


def test_error_from_a_worker_is_the_message_alone(tmp_path: Path) -> None:
    paths = write_numbered(tmp_path, 4)
    paths[2].write_bytes(half(paths[2].read_bytes()))
    data = load_dataset(folder_cfg(tmp_path), "train")
    batches = make_batches(data, 2, shuffle=False, drop_last=False, seed=0, num_workers=2)
    with pytest.raises(BadImageError) as err:
        list(batches)
    message = str(err.value)
    del err  # its traceback holds the loader, in a cycle with this frame: free the workers now
    assert message.startswith(f"cannot decode image {paths[2]}: ") and "Remove or replace" in message
    assert "Traceback" not in message and "DataLoader worker" not in message and "\n" not in message


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_keeps_batches_full_and_counts(tmp_path: Path, num_workers: int) -> None:
    paths = write_numbered(tmp_path, 12)
    paths[3].write_bytes(half(paths[3].read_bytes()))  # truncated PNG
    paths[7].unlink()
    paths[7].with_suffix(".jpg").write_bytes(half(tio.encode_jpeg(noise(S, S)).numpy().tobytes()))  # truncated JPEG
    bad = {3: paths[7].with_suffix(".jpg"), 7: paths[3]}
    data = load_dataset(folder_cfg(tmp_path, bad_images="skip"), "train")
    batches = make_batches(data, 4, shuffle=True, drop_last=True, seed=1, num_workers=num_workers)

    def substitute(i: int) -> int:
        return i + 1 if i in (3, 7) else i  # the next decodable image in index order

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in (0, 1):
            batches.set_epoch(epoch)
            expected = [[substitute(i) for i in idx.tolist()] for idx in batches.indices()]
            got = list(batches)
            assert len(got) == len(expected) == 3
            for (images, labels), want in zip(got, expected):
                assert images.shape == (4, 3, S, S) and images.dtype == torch.uint8
                assert labels.tolist() == want
                expected_images = torch.stack([torch.full((3, S, S), fill(i), dtype=torch.uint8) for i in want])
                assert torch.equal(images, expected_images)
            assert batches.bad_images == 2 * (epoch + 1)  # every sample is drawn once per epoch
    skipped = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    assert len(skipped) == 2  # once per file, from the main process even with workers
    assert sorted(str(p) in m for m in skipped for p in bad.values()).count(True) == 2
    assert all("data.bad_images=skip" in m for m in skipped)


def test_skip_over_consecutive_bad_files_wraps_around(tmp_path: Path) -> None:
    paths = write_numbered(tmp_path, 4)
    for i in (2, 3):
        paths[i].write_bytes(b"")
    data = load_dataset(folder_cfg(tmp_path, bad_images="skip"), "train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        assert [data[i][1] for i in range(4)] == [0, 1, 0, 0]  # 2 -> 3 (bad) -> 0
    batches = make_batches(data, 4, shuffle=False, drop_last=False, seed=0)
    with pytest.warns(BadImageWarning):
        (images, labels), = list(batches)
    assert labels.tolist() == [0, 1, 0, 0] and batches.bad_images == 2
    assert images[:, 0, 0, 0].tolist() == [fill(0), fill(1), fill(0), fill(0)]


def test_skip_with_every_image_bad_is_an_error(tmp_path: Path) -> None:
    paths = write_numbered(tmp_path, 3)
    for path in paths:
        path.write_bytes(b"not an image")
    data = load_dataset(folder_cfg(tmp_path, bad_images="skip"), "train")
    batches = make_batches(data, 2, shuffle=True, drop_last=True, seed=0)
    with pytest.raises(BadImageError, match=rf"none of the 3 images under {tmp_path} can be decoded.*data.root"):
        list(batches)


def test_invalid_bad_images_value(tmp_path: Path) -> None:
    write_numbered(tmp_path, 2)
    with pytest.raises(ConfigError, match=r"data.bad_images='ignore': expected 'error' or 'skip'"):
        load_config(None, ["data.bad_images=ignore"])
    with pytest.raises(UserError, match=r"data.bad_images must be one of error, skip .*got 'Skip'"):
        ImageFolder.scan(tmp_path, S, bad_images="Skip")


# ---------------------------------------------------------------------------------------
# Images of another mode or size: (channels, S, S) uint8 whatever the file holds


def palette_png() -> bytes:
    image = Image.new("P", (5, 7), 0)
    image.putpalette([10, 200, 30] + [0, 0, 0] * 255)
    return pil_bytes(image, "PNG", transparency=1)  # a tRNS chunk, as palette images with alpha have


def cmyk_jpeg() -> bytes:
    image = Image.new("CMYK", (6, 6), (0, 255, 255, 0))  # red
    data = pil_bytes(image, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    return data


MODES: dict[str, tuple[str, Callable[[], bytes], tuple[int, int, int], int]] = {
    # name: (file name, bytes, expected RGB, tolerance)
    "gray_png": ("a.png", lambda: pil_bytes(Image.new("L", (6, 9), 77), "PNG"), (77, 77, 77), 0),
    "bilevel_png": ("a.png", lambda: pil_bytes(Image.new("1", (6, 9), 1), "PNG"), (255, 255, 255), 0),
    "gray_alpha_png": ("a.png", lambda: pil_bytes(Image.new("LA", (6, 9), (77, 200)), "PNG"), (77, 77, 77), 0),
    "rgba_png": ("a.png", lambda: pil_bytes(Image.new("RGBA", (9, 6), (255, 0, 0, 255)), "PNG"), (255, 0, 0), 0),
    "translucent_rgba_png": ("a.png", lambda: pil_bytes(Image.new("RGBA", (9, 6), (255, 0, 0, 60)), "PNG"),
                             (255, 0, 0), 0),
    "palette_png": ("a.png", palette_png, (10, 200, 30), 0),
    "gray_16bit_png": ("a.png", lambda: raw_png(np.full((5, 7), 40000, np.uint16), 0), (156, 156, 156), 0),
    "rgb_16bit_png": ("a.png", lambda: raw_png(np.full((5, 7, 3), (65535, 0, 32768), np.uint16), 2),
                      (255, 0, 128), 0),
    "png_named_jpg": ("a.jpg", lambda: pil_bytes(Image.new("RGB", (6, 6), (1, 2, 3)), "PNG"), (1, 2, 3), 0),
    "gray_jpeg": ("a.jpg", lambda: pil_bytes(Image.new("L", (16, 16), 77), "JPEG"), (77, 77, 77), 2),
    "cmyk_jpeg": ("a.jpg", cmyk_jpeg, (255, 0, 0), 8),
    "rgba_webp": ("a.webp", lambda: pil_bytes(Image.new("RGBA", (6, 6), (255, 0, 0, 128)), "WEBP", lossless=True),
                  (255, 0, 0), 0),
}


@pytest.mark.parametrize("kind", list(MODES))
def test_image_mode_becomes_the_configured_channels(tmp_path: Path, kind: str) -> None:
    name, make, rgb, tolerance = MODES[kind]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / name).write_bytes(make())
    image = load_dataset(folder_cfg(tmp_path), "train")[0][0]
    assert image.shape == (3, S, S) and image.dtype == torch.uint8
    assert (image.int() - torch.tensor(rgb).view(3, 1, 1)).abs().max() <= tolerance
    gray = load_dataset(folder_cfg(tmp_path, channels=1), "train")[0][0]
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    assert gray.shape == (1, S, S) and gray.dtype == torch.uint8
    assert (gray.float() - luma).abs().max() <= tolerance + 1


@pytest.mark.parametrize("height, width", [(1, 1), (3, 40), (64, 48), (S, S)])
def test_image_size_becomes_the_configured_square(tmp_path: Path, height: int, width: int) -> None:
    (tmp_path / "c").mkdir()
    tio.write_png(torch.full((3, height, width), 90, dtype=torch.uint8), str(tmp_path / "c" / "a.png"))
    image = load_dataset(folder_cfg(tmp_path), "train")[0][0]
    assert image.shape == (3, S, S) and image.dtype == torch.uint8 and image.is_contiguous()
    assert torch.equal(image, torch.full((3, S, S), 90, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------
# Empty datasets


def test_class_folders_without_images(tmp_path: Path) -> None:
    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError) as err:
        load_dataset(folder_cfg(tmp_path), "train")
    message = str(err.value)
    assert f"no images in {tmp_path / 'train'}" in message and "2 class folder(s) (cat, dog)" in message
    assert ".jpg" in message and "Put the images in them" in message


def test_images_without_class_folders(tmp_path: Path) -> None:
    tio.write_png(noise(), str(tmp_path / "loose.png"))
    with pytest.raises(UserError) as err:
        load_dataset(folder_cfg(tmp_path, labels="folders"), "train")
    message = str(err.value)
    assert f"data.labels=folders but {tmp_path} holds 1 loose image(s) and no class folders" in message
    assert "loose.png" in message and "one subfolder per class" in message and "data.labels=none" in message
    data = load_dataset(folder_cfg(tmp_path), "train")  # labels=auto: no labels
    assert len(data) == 1 and data.num_classes == 0 and data.labels.tolist() == [-1]


def test_empty_root(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=rf"no images in {tmp_path}: no files with extensions .* at any depth.*root"):
        load_dataset(folder_cfg(tmp_path), "train")


@pytest.mark.parametrize("key, value", [("train_limit", 0), ("test_limit", 0), ("train_limit", -3)])
def test_limit_that_leaves_no_images(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=rf"data.{key}={value}: expected greater than or equal to 1"):
        load_config(None, [f"data.{key}={value}"])


# ---------------------------------------------------------------------------------------
# Fashion-MNIST idx files and CIFAR batches


def load_fashion_mnist(root: Path) -> None:
    load_dataset(DataConfig(name="fashion_mnist", root=str(root)), "train")


def assert_idx_error(err: pytest.ExceptionInfo, path: Path, what: str) -> None:
    message = str(err.value)
    assert str(path) in message and what in message
    assert "delete it and get it again" in message and "data.download=true" in message


def test_idx_gzip_cut_short(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(half(path.read_bytes()))
    with pytest.raises(UserError) as err:  # gzip alone raises EOFError, which the CLI would show as a traceback
        load_fashion_mnist(tmp_path)
    assert_idx_error(err, path, "not a readable gzip file")


def test_idx_gz_that_is_not_gzip(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(b"<html>rate limited</html>")  # a download that saved an error page
    with pytest.raises(UserError) as err:
        load_fashion_mnist(tmp_path)
    assert_idx_error(err, path, "not a readable gzip file")


def test_idx_of_another_format(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\0\0\x0d\x03" + bytes(100)))  # float idx, not unsigned byte
    with pytest.raises(UserError) as err:
        load_fashion_mnist(tmp_path)
    assert_idx_error(err, path, "not an unsigned-byte idx file")


def test_idx_payload_truncated(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError) as err:
        load_fashion_mnist(tmp_path)
    assert_idx_error(err, path, "truncated or damaged")


def test_idx_header_truncated(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:9])
    with pytest.raises(UserError) as err:
        load_fashion_mnist(tmp_path)
    assert_idx_error(err, path, "ends inside its idx header")


def test_idx_images_and_labels_disagree(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(6))  # 7 images
    with pytest.raises(UserError) as err:
        load_fashion_mnist(tmp_path)
    assert_idx_error(err, tmp_path / "train-labels-idx1-ubyte.gz", "7 images")
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(err.value)


def test_idx_files_swapped(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    images, labels = tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels-idx1-ubyte.gz"
    images_bytes = images.read_bytes()
    images.write_bytes(labels.read_bytes())
    labels.write_bytes(images_bytes)
    with pytest.raises(UserError) as err:
        load_fashion_mnist(tmp_path)
    assert_idx_error(err, images, "swapped")


def test_idx_without_images(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((0, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(0))
    with pytest.raises(UserError) as err:
        load_fashion_mnist(tmp_path)
    assert_idx_error(err, tmp_path / "train-images-idx3-ubyte.gz", "holds 0 images")


CIFAR_BATCH = "cifar-10-batches-py/data_batch_2"


def assert_cifar_error(tmp_path: Path, what: str) -> None:
    with pytest.raises(UserError) as err:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)), "train")
    message = str(err.value)
    assert str(tmp_path / CIFAR_BATCH) in message and what in message
    assert f"delete {tmp_path / 'cifar-10-batches-py'}" in message and "cifar-10-python.tar.gz" in message
    assert "data.download=true" in message


def test_cifar_batch_truncated(tmp_path: Path) -> None:
    write_cifar(tmp_path, 10)
    path = tmp_path / CIFAR_BATCH
    path.write_bytes(half(path.read_bytes()))
    assert_cifar_error(tmp_path, "not a readable CIFAR batch")


def test_cifar_batch_not_a_pickle(tmp_path: Path) -> None:
    write_cifar(tmp_path, 10)
    (tmp_path / CIFAR_BATCH).write_text("version https://git-lfs.github.com/spec/v1\n")  # an LFS pointer
    assert_cifar_error(tmp_path, "not a readable CIFAR batch")


def test_cifar_batch_of_the_other_cifar(tmp_path: Path) -> None:
    write_cifar(tmp_path, 10)
    batch = {"data": np.zeros((2, 3072), np.uint8), "fine_labels": [0, 1], "coarse_labels": [0, 0]}
    (tmp_path / CIFAR_BATCH).write_bytes(pickle.dumps(batch))
    assert_cifar_error(tmp_path, "not a CIFAR batch with 'data' and 'labels'")


def test_cifar_batch_of_the_wrong_shape(tmp_path: Path) -> None:
    write_cifar(tmp_path, 10)
    (tmp_path / CIFAR_BATCH).write_bytes(pickle.dumps({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}))
    assert_cifar_error(tmp_path, "(2, 1024)")


def test_training_logs_the_skipped_images(tmp_path: Path) -> None:
    """Through the training loop: the run goes on, and each epoch_end counts what it skipped."""
    from sslkit.config import load_config
    from sslkit.engine import read_metrics, train

    paths = write_numbered(tmp_path / "data", 8)
    paths[5].write_bytes(half(paths[5].read_bytes()))
    cfg = load_config(None, [
        "data.name=image_folder", f"data.root={tmp_path / 'data'}", f"data.image_size={S}", "data.bad_images=skip",
        "data.num_workers=0", "model.backbone=tiny_cnn", "model.width=4", f"augment.size={S}",
        "method.proj_hidden_dim=8", "method.proj_output_dim=8", "train.batch_size=4", "train.epochs=2",
        "train.progress=false", "eval.knn=false", f"train.output_dir={tmp_path}", "train.name=run",
    ])
    with pytest.warns(BadImageWarning, match=str(paths[5])):
        train(cfg)
    ends = [m for m in read_metrics(tmp_path / "run") if m.get("event") == "epoch_end"]
    assert [m.get("bad_images") for m in ends] == [1, 1]


def test_bad_data_leaves_no_run_directory(tmp_path: Path) -> None:
    """The run directory is written only once data and model are built, so fixing the input and
    rerunning needs no overwrite=true: a folder without images fails in the data layer, a bad
    value already in the config."""
    from sslkit.engine import train

    (tmp_path / "data").mkdir()
    cfg = load_config(None, ["data.name=image_folder", f"data.root={tmp_path / 'data'}", f"data.image_size={S}",
                             f"train.output_dir={tmp_path / 'runs'}", "train.name=run"])
    with pytest.raises(UserError, match="no images"):
        train(cfg)
    assert not (tmp_path / "runs" / "run").exists()
    with pytest.raises(ConfigError, match="data.bad_images"):
        load_config(None, ["data.bad_images=maybe"])
