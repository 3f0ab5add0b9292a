"""Folders of image files (any tree, with or without class folders), decoded per item by loader workers.

Undecodable files (truncated, corrupt, empty, not an image) follow ``data.bad_images``:
``error`` raises a ``BadImageError`` naming the file; ``skip`` replaces the sample by the
next decodable image in index order (deterministic, so batches keep their size and runs
stay reproducible) and reports the file, which ``Batches`` counts and warns about once.

``data.decode`` says where files become pixels. ``workers`` (the default): in the loader
workers, as above. ``device``: JPEGs on the training device. The workers only read each
file and check that it is a JPEG nvjpeg takes (8-bit Huffman, 1 or 3 components, ending in
its EOI marker); the main process decodes the batch with one
``torchvision.io.decode_jpeg(list, device=device)`` call (batched nvjpeg on CUDA,
libjpeg-turbo on the CPU), resizes and crops on the device: no pixels cross the host. Other
files (PNG, WebP, GIF, CMYK or arithmetic-coded or cut-short JPEG) are decoded by the
workers as with ``workers`` and take their place in the batch. A JPEG the device decoder
refuses is loaded again on the CPU (``ImageFolder.load``), so ``bad_images`` behaves as
with ``workers``. It pays when the workers bound the step rate (few CPU cores per GPU); on
the CPU it moves the decoding into the main process, which is slower.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
import torch
import torchvision.io as tio
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError

from sslkit.errors import UserError
from sslkit.config import DataConfig
from sslkit.data.datasets import DATASETS, check_bad_images, match_channels

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # what the decoders below read
_SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val")}  # ImageNet calls its test split "val"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TORCHVISION_SIGNATURES = (b"\xff\xd8\xff", b"GIF87a", b"GIF89a")  # JPEG, GIF; WebP is RIFF....WEBP
_SKIP_HINT = "data.bad_images=skip"
DECODE = ("workers", "device")  # the values of data.decode
# Start-of-frame markers of the JPEGs nvjpeg decodes: baseline, extended and progressive Huffman.
_SOF_DEVICE = (0xC0, 0xC1, 0xC2)
_SOF_OTHER = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)  # lossless, hierarchical, arithmetic


class BadImageError(UserError):
    """An image file that cannot be read or decoded: bad input, not a bug."""


class BadImageWarning(UserWarning):
    """An undecodable image file skipped under ``data.bad_images=skip``."""


def decode_image_file(
    path: str, channels: int, min_side: Optional[int] = None, read: Optional[Callable[[], np.ndarray]] = None
) -> torch.Tensor:
    """``path`` as uint8 ``(channels, H, W)``; any read or decoding failure is a ``BadImageError``.
    ``read``: gives the bytes (uint8 ``(n,)``) when they are not the file ``path`` (a member of a
    tar shard, a cell of a table); ``path`` then only names the image in messages.

    ``min_side``: the side the image will be resized to. A JPEG at least twice as large on both
    sides is decoded at reduced size by libjpeg's DCT scaling (1/2, 1/4 or 1/8, through Pillow's
    ``draft``), to the smallest scale that keeps both sides at least ``min_side``: a 2000 x 1500
    photo for a 256 px square decodes at 500 x 375 (decode and resize: 12 ms against 19 ms in
    full, one thread, q90 photo-like content).

    The format comes from the bytes, not the extension. JPEG and WebP go to torchvision
    (libjpeg-turbo / libwebp; a truncated JPEG raises). PNG goes to Pillow: torchvision's
    libpng decoder crashes the process (SIGSEGV) on PNG data that fails its checksums, where
    Pillow raises. Grayscale, alpha, palette, 16-bit and CMYK images become ``channels``
    channels of 8 bits (alpha is dropped, 16-bit samples keep their high byte): each decoder
    gives the file's gray, or RGB, and ``match_channels`` makes ``channels`` of it, so every
    format and decoder turns colour into gray with the same ``rgb_to_grayscale``, and a gray
    file's levels stay as they are.
    """
    try:
        raw = np.fromfile(path, dtype=np.uint8) if read is None else read()  # (bytes,), writable: no copy for torch
        if raw.size == 0:
            raise ValueError("the file is empty (0 bytes)")
        head = raw[:12].tobytes()
        webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
        if head.startswith(_PNG_SIGNATURE):
            image = _decode_png(raw)
        elif not (head.startswith(_TORCHVISION_SIGNATURES) or webp):
            raise ValueError(f"not a JPEG, PNG or WebP image (it starts with {head!r})")
        elif min_side is not None and head.startswith(b"\xff\xd8\xff") and _reducible(raw, min_side):
            image = _decode_jpeg_reduced(raw, min_side)
        else:
            # RGB, not libjpeg's GRAY (its Y channel, not our luma of the RGB); a gray JPEG's RGB
            # is its gray repeated, which rgb_to_grayscale maps back exactly.
            image = tio.decode_image(torch.from_numpy(raw), mode=tio.ImageReadMode.RGB)
            if image.dim() == 4:  # (frames, C, H, W): an animated GIF under an image extension, its first frame
                image = image[0]
    except Exception as err:  # OSError, RuntimeError, PIL errors (some are SyntaxError): all mean a bad file
        if isinstance(err, OSError) and err.strerror:  # cannot read the file: no such file, permission
            reason = err.strerror
        elif isinstance(err, UnidentifiedImageError):  # its message shows a BytesIO object
            reason = "not a readable PNG image (its header is damaged or cut short)"
        else:
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            # torchvision prefixes its messages with the C++ source location: keep what follows.
            reason = reason.rsplit(".cpp:", 1)[-1].split(", ", 1)[-1] if ".cpp:" in reason else reason
        reason = reason.rstrip(".")
        raise BadImageError(
            f"cannot decode image {path}: {reason}. Remove or replace this file, "
            f"or set {_SKIP_HINT} to train on without it (each such sample is replaced by the next image)"
        ) from err
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3) or 0 in image.shape:
        raise BadImageError(
            f"cannot decode image {path}: decoded to {image.dtype} {tuple(image.shape)}, not uint8 "
            f"(1 or 3, H, W). Remove or replace this file, or set {_SKIP_HINT}"
        )
    return match_channels(image, channels)


def _jpeg_size(raw: np.ndarray) -> Optional[tuple[int, int]]:
    """A JPEG's (height, width) from its frame header, by walking the markers before it
    (microseconds, no decoding); None when no frame header comes before the scan."""
    data, n, pos = memoryview(raw), raw.size, 2
    while pos + 9 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # fill byte, markers without a length
            pos += 1 if marker == 0xFF else 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            return (data[pos + 5] << 8) | data[pos + 6], (data[pos + 7] << 8) | data[pos + 8]
        if marker == 0xDA:
            return None
        pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
    return None


def _reducible(raw: np.ndarray, side: int) -> bool:
    """Whether a JPEG is at least ``2 * side`` on both sides, in a mode that DCT scaling keeps
    as torchvision decodes it (YCbCr or gray; not CMYK): reads the header only. A header Pillow
    cannot read is left to torchvision, whose error names the problem."""
    size = _jpeg_size(raw)
    if size is not None and min(size) < 2 * side:  # most files: no need for Pillow's slower header read
        return False
    try:
        with Image.open(io.BytesIO(raw), formats=["JPEG"]) as im:
            return min(im.size) >= 2 * side and im.mode in ("RGB", "L")
    except Exception:  # noqa: BLE001 - any failure: not reducible
        return False


def _decode_jpeg_reduced(raw: np.ndarray, side: int) -> torch.Tensor:
    """JPEG bytes as uint8 (3, H, W) RGB, decoded at the smallest DCT scale whose sides are at least ``side``."""
    with Image.open(io.BytesIO(raw), formats=["JPEG"]) as im:
        im.draft("RGB", (side, side))  # picks the scale; decoding happens below
        array = np.asarray(im.convert("RGB"))  # (H, W, 3); truncated data raises here
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _decode_png(raw: np.ndarray) -> torch.Tensor:
    """PNG bytes as uint8 (1, H, W) for a gray file, else (3, H, W) RGB; alpha dropped."""
    with Image.open(io.BytesIO(raw), formats=["PNG"]) as im:
        im.load()  # decodes; truncated or corrupt data raises here
        if im.mode.startswith("I"):  # 16-bit (I;16*) or 32-bit integer gray: keep the high byte of 16 bits
            gray = np.asarray(im).astype(np.int64).clip(0, 65535) >> 8
            im = Image.fromarray(gray.astype(np.uint8), mode="L")
        elif im.mode == "P":
            im = im.convert("RGBA")  # palette transparency, without Pillow's warning
        # Pillow's "L" of a colour image is its own luma (fixed point): colour goes to RGB, and
        # match_channels makes the gray
        im = im.convert("L" if im.mode in ("1", "L", "LA") else "RGB")
        array = np.asarray(im)  # (H, W) or (H, W, 3)
    return torch.from_numpy(array.copy()).view(array.shape[0], array.shape[1], -1).permute(2, 0, 1)


def check_decode(value: str) -> None:
    if value not in DECODE:
        raise UserError(
            f"data.decode must be one of {', '.join(DECODE)} (workers: decode image files in the loader "
            f"workers; device: decode JPEG files on the training device, nvjpeg on a GPU), got {value!r}"
        )


def device_jpeg(raw: np.ndarray) -> bool:
    """Whether the bytes ``raw`` look like a whole JPEG that ``decode_jpeg`` takes on any device:
    8-bit, Huffman-coded (baseline, extended or progressive), 1 or 3 components and not
    Adobe-transformed (CMYK, YCCK, RGB), ending in its EOI marker (a cut-short file does not).
    It reads the markers before the first frame header only: microseconds, no decoding."""
    n = raw.size
    if n < 8 or raw[0] != 0xFF or raw[1] != 0xD8 or raw[n - 2] != 0xFF or raw[n - 1] != 0xD9:
        return False
    data = memoryview(raw)
    pos = 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF_DEVICE:
            if pos + 10 > n:
                return False
            precision, components = data[pos + 4], data[pos + 9]
            height, width = (data[pos + 5] << 8) | data[pos + 6], (data[pos + 7] << 8) | data[pos + 8]
            if components == 3 and pos + 17 <= n and bytes(data[pos + 10 : pos + 17 : 3]) == b"RGB":
                return False  # component ids R, G, B: an RGB (not YCbCr) JPEG
            return precision == 8 and components in (1, 3) and height > 0 and width > 0
        if marker in _SOF_OTHER or marker in (0xD9, 0xDA) or length < 2:  # no frame we take, or damaged
            return False
        if marker == 0xEE and bytes(data[pos + 4 : pos + 9]) == b"Adobe":  # a colour transform flag
            return False
        pos += 2 + length
    return False


class ImageFolder(torch.utils.data.Dataset):
    """Image files as ``(uint8 (C, S, S), label)`` items; build one with ``ImageFolder.scan``.

    Each image is decoded (RGB, or grayscale with ``channels=1``, whatever the file's own
    mode; colour becomes gray by ``sslkit.augment.rgb_to_grayscale`` for every format and
    decoder), its shorter side resized to ``image_size`` (antialiased) and centre-cropped to a
    square. ``bad_images`` ("error" | "skip") says what an undecodable file does; see
    ``load``. ``decode`` ("workers" | "device") is where ``Batches`` decodes JPEG files: items
    (``[i]``, ``load``) are decoded here either way; with "device" a batch is ``read`` by
    the workers and decoded by ``decode_jpegs`` (see the module docstring).
    """

    def __init__(
        self,
        paths: np.ndarray,
        labels: torch.Tensor,
        classes: list[str],
        image_size: int,
        channels: int = 3,
        bad_images: str = "error",
        decode: str = "workers",
        info: Optional[dict[str, Any]] = None,
    ) -> None:
        check_bad_images(bad_images)
        check_decode(decode)
        self.info = info or {}  # what describe() reports: labels mode, files skipped while scanning
        # A numpy string array, not a list of str: forked workers reading Python objects
        # touch their refcounts and copy the pages, growing memory by the list's size each.
        self.paths = paths  # (N,) str
        self.labels = labels  # (N,) int64
        self.classes = classes
        self.image_size = image_size
        self.channels = channels
        self.bad_images = bad_images
        self.decode = decode

    @classmethod
    def scan(
        cls, folder: Path, image_size: int, channels: int = 3, bad_images: str = "error", decode: str = "workers",
        labels: str = "auto",
    ) -> ImageFolder:
        """Every image file below ``folder``, at any depth, through symlinked folders; hidden and
        non-image files are skipped and counted (``info``). ``labels``: "folders" (the sorted
        first-level subfolders are the classes), "none" (no labels: -1, ``num_classes`` 0) or
        "auto" (folders when ``folder`` holds subfolders and no loose images, else none)."""
        check_bad_images(bad_images)
        check_decode(decode)
        if labels not in LABELS:
            raise UserError(f"data.labels must be one of {', '.join(LABELS)}, got {labels!r}")
        if not folder.is_dir():
            raise UserError(f"data.root {folder} is not a folder: point it at the folder of images")
        entries = sorted(folder.iterdir())
        classes = [p.name for p in entries if p.is_dir() and not p.name.startswith(".")]
        loose = [p for p in entries if p.is_file() and not p.name.startswith(".") and _is_image_name(p.name)]
        mode = ("folders" if classes and not loose else "none") if labels == "auto" else labels
        skipped: dict[str, int] = {}
        paths: list[str] = []
        targets: list[int] = []
        if mode == "none":
            paths = _find_images(folder, skipped)
            targets = [-1] * len(paths)
            classes = []
        else:
            if loose:
                if bad_images == "error" or not classes:
                    where = "beside its class folders" if classes else "and no class folders"
                    raise UserError(
                        f"data.labels=folders but {folder} holds {len(loose)} loose image(s) {where}, e.g. "
                        f"{loose[0]}: move them into one subfolder per class, set data.labels=none to train on "
                        f"every image without labels"
                        + (f", or set {_SKIP_HINT} to leave them out" if classes else "")
                    )
                skipped["loose"] = len(loose)
            for label, name in enumerate(classes):
                found = _find_images(folder / name, skipped)
                paths += found
                targets += [label] * len(found)
            skipped["not_image"] = skipped.get("not_image", 0) + sum(
                1 for p in entries if p.is_file() and not p.name.startswith(".") and not _is_image_name(p.name))
            skipped["hidden"] = skipped.get("hidden", 0) + sum(1 for p in entries if p.name.startswith("."))
        if not paths:
            raise UserError(_no_images_message(folder, classes, skipped))
        info = {"labels": mode, "skipped": {k: v for k, v in skipped.items() if v}}
        return cls(np.array(paths), torch.tensor(targets, dtype=torch.int64), classes, image_size, channels,
                   bad_images, decode, info)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def item_keys(self) -> np.ndarray:
        """Each sample's file path, in index order (see ``sslkit.data.datasets.item_keys``)."""
        return self.paths

    def _fit(self, image: torch.Tensor) -> torch.Tensor:
        """``(..., C, H, W)`` -> ``(..., C, S, S)``: the whole image resized (antialiased) to the
        square, its aspect undone; the crops (``sslkit.augment``) and the evaluation's centre
        square restore it from the image's own size, which ``load`` returns with it."""
        if image.shape[-2:] == (self.image_size, self.image_size):
            return image
        return TF.resize(image, [self.image_size, self.image_size], antialias=True)

    def _raw(self, index: int) -> np.ndarray:
        """The bytes of item ``index``'s image, uint8 ``(n,)``; a failure to read raises (OSError,
        ValueError). Sources whose images are not files (tar shards, tables) override this."""
        return np.fromfile(str(self.paths[index]), dtype=np.uint8)

    def _decode(self, index: int) -> tuple[torch.Tensor, tuple[int, int]]:
        image = decode_image_file(str(self.paths[index]), self.channels, self.image_size,
                                  lambda: self._raw(index))  # (C, H, W)
        return _contiguous(self._fit(image)), (image.shape[1], image.shape[2])  # (C, S, S), (H, W)

    def load(self, index: int) -> tuple[torch.Tensor, int, Optional[tuple[str, str]], tuple[int, int]]:
        """``(image, label, bad, size)``: the image resized whole to ``(C, S, S)`` and its own
        ``size`` (height, width) as decoded; ``bad`` is None, or ``(path, reason)`` when the file
        at ``index`` did not decode and (``bad_images="skip"``) the image and label are those of
        the next decodable file in index order, wrapping around. Warns nothing: the caller
        reports ``bad`` (``Batches`` does, once per file, in the main process)."""
        n = len(self)
        try:
            return _item(self._decode(index), int(self.labels[index]), None)
        except BadImageError as err:
            if self.bad_images == "error":
                raise
            bad = (str(self.paths[index]), str(err))
        for step in range(1, n):
            j = (index + step) % n
            try:
                return _item(self._decode(j), int(self.labels[j]), bad)
            except BadImageError:
                continue
        folder = os.path.commonpath([str(self.paths[0]), str(self.paths[-1])])
        raise BadImageError(
            f"none of the {n} images under {folder} can be decoded ({_SKIP_HINT} needs at least one), "
            f"e.g. {bad[1]}. Check that data.root points at the image files"
        )

    def read(self, index: int) -> tuple[torch.Tensor, int, Optional[tuple[str, str]], Optional[tuple[int, int]]]:
        """``load`` for ``decode="device"``, run by the loader workers: ``(bytes, label, None, None)``,
        the file's bytes as a uint8 ``(n,)`` tensor, when it is a JPEG that ``device_jpeg``
        accepts; otherwise ``load(index)`` (pixels ``(C, S, S)``, or its ``BadImageError``)."""
        try:
            raw = self._raw(index)
        except (OSError, ValueError):
            return self.load(index)  # the error (or the skip) names the file as load says it
        if not device_jpeg(raw):
            return self.load(index)
        return torch.from_numpy(raw), int(self.labels[index]), None, None

    def decode_jpegs(
        self, jpegs: list[torch.Tensor], indices: list[int], device: Union[str, torch.device]
    ) -> tuple[list[torch.Tensor], list[tuple[int, int]], list[tuple[int, int, Optional[tuple[str, str]]]]]:
        """Decode JPEG bytes from ``read`` on ``device``: ``(images, sizes, fallbacks)``.

        ``images``: one uint8 ``(C, S, S)`` on ``device`` per file, as ``load`` gives it up to
        the decoder (nvjpeg on CUDA rounds differently from libjpeg-turbo: a grey level or
        two): decoded to RGB, then ``match_channels`` as ``load`` does. One batched
        ``decode_jpeg`` call; when it fails, each file alone, and a file that fails alone is
        loaded on the CPU by ``load(indices[i])``, which applies ``bad_images`` (raises its
        ``BadImageError``, or uses the next decodable image).
        ``sizes``: each image's own (height, width), as ``load``'s (JPEGs are decoded at full
        size here: no DCT scaling).
        ``fallbacks``: ``(i, label, bad)`` for each such file, ``label`` that of the image used.
        """
        device = torch.device(device)
        try:
            decoded: list[Optional[torch.Tensor]] = list(
                tio.decode_jpeg(jpegs, mode=tio.ImageReadMode.RGB, device=device)
            )
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # one bad file fails the whole call: find it
            decoded = [_decode_jpeg_alone(jpeg, device) for jpeg in jpegs]
        images: list[Optional[torch.Tensor]] = [None] * len(jpegs)
        sizes: list[tuple[int, int]] = [(0, 0)] * len(jpegs)
        shapes: dict[tuple[int, ...], list[int]] = {}  # images of one size are resized together
        for i, image in enumerate(decoded):
            if image is not None and image.dim() == 3 and image.shape[0] == 3 and image.numel() > 0:
                shapes.setdefault(tuple(image.shape), []).append(i)
        for shape, members in shapes.items():
            group = match_channels(_stack([decoded[i] for i in members]), self.channels)  # type: ignore[misc]
            for i, image in zip(members, self._fit(group).unbind(0)):
                images[i], sizes[i] = image, (shape[1], shape[2])
        fallbacks = []
        for i, image in enumerate(images):
            if image is None:
                pixels, label, bad, sizes[i] = self.load(indices[i])
                images[i] = pixels.to(device)
                fallbacks.append((i, label, bad))
        return images, sizes, fallbacks  # type: ignore[return-value]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label, bad, _ = self.load(index)
        if bad is not None:
            warnings.warn(skip_message(*bad), BadImageWarning, stacklevel=2)
        return image, label

    def subset(self, index: np.ndarray) -> ImageFolder:
        """The samples at ``index`` (M,) int, in that order."""
        return ImageFolder(
            self.paths[index], self.labels[torch.as_tensor(index, dtype=torch.long)], self.classes, self.image_size,
            self.channels, self.bad_images, self.decode, self.info,
        )

    def head(self, n: int) -> ImageFolder:
        """The first ``n`` samples (in class order, so a small ``n`` covers few classes)."""
        return ImageFolder(
            self.paths[:n], self.labels[:n], self.classes, self.image_size, self.channels, self.bad_images,
            self.decode, self.info,
        )


def _item(decoded: tuple[torch.Tensor, tuple[int, int]], label: int, bad: Optional[tuple[str, str]]) -> tuple:
    """``load``'s ``(image, label, bad, size)`` from ``_decode``'s ``(image, size)``."""
    return decoded[0], label, bad, decoded[1]


def _contiguous(image: torch.Tensor) -> torch.Tensor:
    """``image.contiguous()`` of a CPU uint8 image: numpy copies libjpeg's (H, W, C) memory into
    (C, H, W) about twice as fast as torch does for uint8."""
    if image.is_contiguous() or image.device.type != "cpu":
        return image.contiguous()
    return torch.from_numpy(np.ascontiguousarray(image.numpy()))


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    """``(C, H, W)`` images of one size as ``(n, C, H, W)`` in their own memory layout: libjpeg
    gives ``(H, W, C)`` memory, which ``torch.stack`` would transpose (slow, for uint8)."""
    if len(images) == 1:
        return images[0][None]
    if all(image.permute(1, 2, 0).is_contiguous() for image in images):
        return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    return torch.stack(images)


def _decode_jpeg_alone(jpeg: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
    """``decode_jpeg`` of one file to RGB, None where it fails."""
    try:
        return tio.decode_jpeg(jpeg, mode=tio.ImageReadMode.RGB, device=device)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:
        return None


def skip_message(path: str, reason: str) -> str:
    """The warning for a skipped file; ``reason`` is the ``BadImageError`` message."""
    reason = reason.split(". Remove or replace", 1)[0]
    return f"{reason}; skipped ({_SKIP_HINT}): its samples use the next decodable image instead"


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _find_images(folder: Path, skipped: dict[str, int]) -> list[str]:
    """Sorted paths of the image files below ``folder`` at any depth, following symlinked
    folders (each real folder once: a link back up is no loop); hidden entries (".name") and
    files of other extensions are counted in ``skipped["hidden"]``, ``skipped["not_image"]``."""
    found: list[str] = []
    seen: set[str] = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        hidden = [d for d in dirs if d.startswith(".")] + [f for f in files if f.startswith(".")]
        skipped["hidden"] = skipped.get("hidden", 0) + len(hidden)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            if _is_image_name(name):
                found.append(os.path.join(top, name))
            else:
                skipped["not_image"] = skipped.get("not_image", 0) + 1
    return sorted(found)


def _no_images_message(folder: Path, classes: list[str], skipped: dict[str, int]) -> str:
    others = sum(skipped.values())
    what = f" ({others} hidden or non-image file(s) skipped)" if others else ""
    if classes:
        shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
        return (
            f"no images in {folder}: its {len(classes)} class folder(s) ({shown}) hold no files with "
            f"extensions {', '.join(IMG_EXTENSIONS)}{what}. Put the images in them, or point data.root at the "
            "folder that holds the images"
        )
    return (
        f"no images in {folder}: no files with extensions {', '.join(IMG_EXTENSIONS)} at any depth{what}. "
        "Point data.root at the folder that holds the images"
    )


LABELS = ("auto", "folders", "none")  # the values of data.labels for image folders


class ImageFolderConfig(DataConfig):
    """``image_folder``'s own key: where labels come from."""

    # folders: first-level subfolders are classes | none: no labels | auto: folders when the root
    # holds only class subfolders, else none
    labels: Literal["auto", "folders", "none"] = "auto"


@DATASETS.register("image_folder", config=ImageFolderConfig)
def image_folder(cfg: ImageFolderConfig, split: str) -> ImageFolder:
    """Image files below ``data.root`` (any depth; ``data.labels`` says whether subfolders are
    classes). When ``data.root`` holds ``train/`` and ``test/`` (or ``val/``, as ImageNet)
    folders, each split is its own; otherwise both splits are the same images (k-NN then
    scores on training images). ``data.image_size`` is required: files differ in size, batches
    do not. ``data.bad_images`` says what an undecodable file does (error | skip);
    ``data.decode`` where JPEG files are decoded (workers | device).
    """
    if cfg.root is None:
        raise UserError("dataset 'image_folder' needs data.root=<folder of images, or of <class>/ folders>")
    if cfg.image_size is None:
        raise UserError("dataset 'image_folder' needs data.image_size=<side in pixels> (e.g. 224)")
    root = Path(cfg.root)
    if not root.is_dir():
        raise UserError(f"data.root {root} is not a folder")
    split_dirs = [root / name for names in _SPLIT_FOLDERS.values() for name in names if (root / name).is_dir()]
    folder = root
    if split_dirs:
        folder = next((root / n for n in _SPLIT_FOLDERS[split] if (root / n).is_dir()), None)
        if folder is None:
            raise UserError(
                f"{root} has split folders ({', '.join(d.name for d in split_dirs)}) but none for the "
                f"{split} split: expected {' or '.join(str(root / n) for n in _SPLIT_FOLDERS[split])}"
            )
    return ImageFolder.scan(folder, cfg.image_size, cfg.channels, cfg.bad_images, cfg.decode, cfg.labels)
