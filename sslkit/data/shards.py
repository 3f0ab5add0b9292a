"""WebDataset tar shards, read by random access through an index of their members.

``data.name=webdataset data.urls=/data/shards-{000000..000127}.tar``: the URL pattern is
expanded as ``webdataset`` expands it (``::`` separates patterns, braces expand), members are
grouped into samples by webdataset's own rule (``webdataset.tariterators.base_plus_ext``: the
key is the name up to the first dot of its file name, consecutive members with one key are one
sample, ``__*__`` metadata skipped, extensions lower-cased), and a sample's image is its first
entry among ``data.image_key`` (``jpg;jpeg;png;webp``), its label the integer (or class name)
in ``data.label_key`` (``cls``).

Why an index, not a stream: opening the set reads each member's 512-byte header (``pread``,
no image data; 50-170 us per sample on a busy 2-core machine, see docs/benchmarks.md), which
gives every sample's shard, byte offset and size; each shard's index is cached
(``cached_index``), so a shard is scanned once, not by every process of every run. The
shards are then a map-style dataset (``ShardImages``, an ``ImageFolder`` whose bytes come
from the tar) and ``Batches`` gives them every guarantee it gives a folder: the order depends
only on ``(seed, epoch)`` (one global permutation of the samples, split over processes; the
loader workers decode the batches the sampler hands them), every sample is seen once per
epoch, every process takes the same number of steps, a run resumed mid-epoch skips exactly
the batches it trained on, and the same images as a folder (written in the folder's order)
give bit-identical batches. A stream (``webdataset.WebDataset`` with a shuffle buffer) could
give none of these without knowing the sample counts first, which takes this same header
scan. The cost: the shards must be files (local or mounted); remote URLs (``http://``,
``s3://``, ``pipe:``) are refused with one line saying so.

Bad shards follow ``data.bad_images``: a file that is not a tar, is damaged or is cut short
is an error naming it (``error``), or (``skip``) the samples before the damage are kept (the
last one it reaches is dropped, as it may have lost members), the rest dropped, and the
shard is warned about and counted in the run's first line (``damaged_shards``). A sample
without an image entry, or whose image does not decode, is a bad image like a bad file in a
folder (``skip``: the next decodable sample takes its place, counted in ``Batches``).
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from sslkit.config import DataConfig
from sslkit.data import datasets
from sslkit.data.datasets import DATASETS
from sslkit.data.image_folder import BadImageError, BadImageWarning, ImageFolder
from sslkit.errors import UserError

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: "__key__"-style members
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, s3:, gs:, pipe: ... (file: is stripped)
_SKIP_HINT = "data.bad_images=skip"


def expand_urls(urls: str) -> list[str]:
    """``data.urls`` as shard files, expanded as webdataset does (``::`` between patterns,
    braces, ``$VAR``); ``file:`` prefixes dropped. Raises a ``UserError`` for a remote URL or
    a missing file (naming it and how many of the pattern's files are missing)."""
    from webdataset.shardlists import expand_urls as wds_expand

    files = [url[len("file:"):] if url.startswith("file:") else url for url in wds_expand(urls)]
    if not files:
        raise UserError(
            f"data.urls={urls!r} names no shard: give a pattern such as /data/shards-{{000000..000127}}.tar"
        )
    remote = [url for url in files if _REMOTE.match(url)]
    if remote:
        raise UserError(
            f"data.urls: {remote[0]} is not a local file: sslkit reads shards by random access, so they must "
            "be files on a local or mounted file system (copy them, or mount the bucket, and give their paths)"
        )
    missing = [path for path in files if not os.path.isfile(path)]
    if missing:
        raise UserError(
            f"data.urls: shard {missing[0]} does not exist ({len(missing)} of the {len(files)} files the pattern "
            f"{urls!r} expands to are missing): check the pattern's folder and its {{first..last}} range"
        )
    return files


@dataclass
class ShardIndex:
    """The samples of one shard, in tar order."""

    keys: list[str]  # (n,) sample keys
    offsets: np.ndarray  # (n,) int64: byte offset of the image entry's data; -1 when the sample has none
    sizes: np.ndarray  # (n,) int64: its length in bytes
    labels: list[Optional[str]]  # (n,) the label entry's text, None when absent
    problem: Optional[str]  # why the shard could not be read to its end (not a tar, damaged, cut short)


def _octal(field: bytes) -> int:
    """A tar number field: octal text, or GNU base-256 when its first byte has the top bit."""
    if field and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax(data: bytes) -> dict[str, str]:
    """The ``key=value`` records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return records


class _Reader:
    """``pread`` through a small window: the headers and small members (labels, pax records)
    that sit between two images come in one read."""

    def __init__(self, fd: int, window: int = 8 * _BLOCK) -> None:
        self.fd, self.window = fd, window
        self.start, self.buf = 0, b""

    def read(self, pos: int, n: int) -> bytes:
        if not (self.start <= pos and pos + n <= self.start + len(self.buf)):
            self.start, self.buf = pos, os.pread(self.fd, max(n, self.window), pos)
        return self.buf[pos - self.start : pos - self.start + n]


def _cut(file_size: int, pos: int, end: int) -> str:
    return f"is cut short at byte {file_size} (its member at byte {pos} needs {end} bytes)"


def _members(fd: int, file_size: int) -> tuple[list[tuple[str, int, int, bytes]], Optional[str]]:
    """Regular members ``(name, data offset, size, first bytes of the data)`` of the tar file
    open as ``fd``, reading headers only (and small members' data), and why the walk stopped
    early (None when it reached the end-of-archive blocks)."""
    members: list[tuple[str, int, int, bytes]] = []
    reader = _Reader(fd)
    pos, long_name, pax = 0, None, {}
    while True:
        if pos + _BLOCK > file_size:
            if pos == 0:
                short = f"is not a tar file ({file_size} bytes, less than a header)"
                return members, "is empty" if file_size == 0 else short
            if pos == file_size:
                return members, f"is cut short at byte {file_size} (no end-of-archive blocks)"
            return members, f"is cut short at byte {file_size} (a header at byte {pos} is incomplete)"
        header = reader.read(pos, _BLOCK)
        if header == _ZERO_BLOCK:
            return members, None
        try:
            ok = _octal(header[148:156]) == sum(header) - sum(header[148:156]) + 8 * 32
        except ValueError:
            ok = False
        if not ok:
            what = "is not a tar file" if pos == 0 else f"is damaged at byte {pos} (a tar header fails its checksum)"
            return members, what
        size, kind = _octal(header[124:136]), header[156:157]
        start = pos + _BLOCK
        if kind in (b"x", b"L", b"g"):
            if start + size > file_size:
                return members, _cut(file_size, pos, start + size)
            data = reader.read(start, size)
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif kind == b"x":
                pax = _pax(data)
        else:
            if kind in (b"0", b"\0", b"7"):  # regular file (7: contiguous)
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                if header[257:262] == b"ustar":
                    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
                    name = f"{prefix}/{name}" if prefix else name
                name = pax.get("path", long_name or name)
                size = int(pax.get("size", size))
                if start + size > file_size:
                    return members, _cut(file_size, pos, start + size)
                members.append((name, start, size, reader.read(start, min(size, _BLOCK))))
            long_name, pax = None, {}
        pos = start + -(-size // _BLOCK) * _BLOCK


def index_shard(path: str, image_exts: tuple[str, ...], label_ext: Optional[str]) -> ShardIndex:
    """The samples of the tar file ``path``, grouped as webdataset groups them."""
    from webdataset.tariterators import base_plus_ext

    keys: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    labels: list[Optional[str]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        members, problem = _members(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    current, rank = None, len(image_exts)  # the key being grouped; the rank of its image entry's extension
    for name, start, size, head in members:
        if _META.match(name):
            continue
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        ext = ext.lower()
        if key != current:
            current, rank = key, len(image_exts)
            keys.append(key)
            offsets.append(-1)
            sizes.append(0)
            labels.append(None)
        if ext in image_exts and image_exts.index(ext) < rank:
            rank = image_exts.index(ext)
            offsets[-1], sizes[-1] = start, size
        elif ext == label_ext:
            labels[-1] = head[:size].decode("utf-8", "replace").strip()
    if problem is not None and keys:  # the sample at the damage may have lost members: drop it
        del keys[-1], offsets[-1], sizes[-1], labels[-1]
    return ShardIndex(keys, np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64), labels, problem)


def cached_index(path: str, image_exts: tuple[str, ...], label_ext: Optional[str]) -> ShardIndex:
    """``index_shard``, kept in ``<cache>/shard-index/`` (``~/.cache/sslkit``) under the shard's
    real path, size and modification time: a shard is scanned once, not by every process of
    every run. A cache that cannot be written (read-only home) only costs the scan."""
    stat = os.stat(path)
    ident = f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{';'.join(image_exts)}|{label_ext}|1"
    cached = datasets.CACHE_DIR / "shard-index" / f"{hashlib.sha1(ident.encode()).hexdigest()}.npz"
    try:
        with np.load(cached) as saved:
            has_label = saved["has_label"]
            labels = [str(t) if has else None for t, has in zip(saved["labels"], has_label)]
            problem = str(saved["problem"]) or None
            return ShardIndex([str(k) for k in saved["keys"]], saved["offsets"], saved["sizes"], labels, problem)
    except (OSError, ValueError, KeyError):  # not cached yet, or a damaged cache file: scan
        pass
    index = index_shard(path, image_exts, label_ext)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, keys=np.array(index.keys, dtype=str), offsets=index.offsets, sizes=index.sizes,
                 labels=np.array([t or "" for t in index.labels], dtype=str),
                 has_label=np.array([t is not None for t in index.labels], dtype=bool), problem=index.problem or "")
        os.replace(tmp, cached)  # atomic: processes indexing the same shard at once do not mix their files
    except OSError:
        pass
    return index


def _label_table(texts: list[Optional[str]]) -> tuple[torch.Tensor, list[str]]:
    """Label texts -> ``(labels (N,) int64, classes)``: integers are class indices (classes
    ``"0".."max"``), other texts class names (sorted); a missing label is -1. No label at all:
    every label -1 and no classes."""
    present = [t for t in texts if t is not None]
    if not present:
        return torch.full((len(texts),), -1, dtype=torch.int64), []
    if all(re.fullmatch(r"[+]?\d+", t) for t in present):
        values = [int(t) if t is not None else -1 for t in texts]
        return torch.tensor(values, dtype=torch.int64), [str(i) for i in range(max(values) + 1)]
    classes = sorted(set(present))
    lookup = {name: i for i, name in enumerate(classes)}
    return torch.tensor([lookup[t] if t is not None else -1 for t in texts], dtype=torch.int64), classes


class ShardImages(ImageFolder):
    """The samples of WebDataset tar shards as ``ImageFolder`` items; build with ``ShardImages.open``.

    ``paths`` holds ``<shard>:<key>`` for each sample (what messages and ``sslkit embed``
    name); the image bytes are read with one ``pread`` from the shard at the indexed offset.
    ``skipped``: ``(shard, reason)`` for each shard not read to its end (``bad_images=skip``).
    """

    def __init__(
        self,
        paths: np.ndarray,
        labels: torch.Tensor,
        classes: list[str],
        image_size: int,
        shards: np.ndarray,
        shard_of: np.ndarray,
        offsets: np.ndarray,
        sizes: np.ndarray,
        channels: int = 3,
        bad_images: str = "error",
        decode: str = "workers",
        image_exts: tuple[str, ...] = ("jpg",),
        skipped: Optional[list[tuple[str, str]]] = None,
    ) -> None:
        skipped = skipped or []
        info = {"labels": "entry" if classes else "none",
                "skipped": {"damaged_shards": len(skipped)} if skipped else {}}
        super().__init__(paths, labels, classes, image_size, channels, bad_images, decode, info)
        self.shards = shards  # (S,) str: the shard files
        self.shard_of = shard_of  # (N,) int32: each sample's shard
        self.offsets = offsets  # (N,) int64: byte offset of its image; -1: it has none
        self.sizes = sizes  # (N,) int64
        self.image_exts = image_exts  # the extensions that make a sample's image entry, in preference order
        self.skipped = skipped

    @classmethod
    def open(
        cls,
        urls: str,
        image_size: int,
        *,
        image_key: str = "jpg;jpeg;png;webp",
        label_key: Optional[str] = "cls",
        channels: int = 3,
        bad_images: str = "error",
        decode: str = "workers",
    ) -> ShardImages:
        """Index the shards of ``urls`` (see the module docstring for the rules)."""
        files = expand_urls(urls)
        image_exts = tuple(ext.strip().lower() for ext in image_key.split(";") if ext.strip())
        paths: list[str] = []
        texts: list[Optional[str]] = []
        shard_of, offsets, sizes = [], [], []
        skipped: list[tuple[str, str]] = []
        for i, path in enumerate(files):
            index = cached_index(path, image_exts, label_key)
            if index.problem is not None:
                kept = f"on its {len(index.keys)} complete samples" if index.keys else "without it"
                fix = f"copy it again or remove it from data.urls, or set {_SKIP_HINT} to train {kept}"
                if bad_images == "error":
                    raise BadImageError(f"shard {path} {index.problem}: {fix}")
                skipped.append((path, f"shard {path} {index.problem}; {len(index.keys)} samples kept"))
            paths += [f"{path}:{key}" for key in index.keys]
            texts += index.labels
            shard_of.append(np.full(len(index.keys), i, dtype=np.int32))
            offsets.append(index.offsets)
            sizes.append(index.sizes)
        offsets_all = np.concatenate(offsets)
        if not (offsets_all >= 0).any():
            raise UserError(
                f"the {len(files)} shard(s) of data.urls={urls!r} hold {len(paths)} samples but none with an image "
                f"entry ({', '.join(image_exts)}): set data.image_key to the image's extension "
                "(e.g. data.image_key=jpeg), or check that these are image shards"
            )
        labels, classes = _label_table(texts)
        data = cls(
            np.array(paths), labels, classes, image_size, np.array(files), np.concatenate(shard_of), offsets_all,
            np.concatenate(sizes), channels, bad_images, decode, image_exts, skipped,
        )
        for _, reason in skipped:
            warnings.warn(f"{reason}; skipped ({_SKIP_HINT})", BadImageWarning, stacklevel=2)
        return data

    def _raw(self, index: int) -> np.ndarray:
        offset = int(self.offsets[index])
        if offset < 0:
            raise ValueError(f"the sample has no image entry ({', '.join(self.image_exts)})")
        size = int(self.sizes[index])
        fd = os.open(str(self.shards[self.shard_of[index]]), os.O_RDONLY)
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        if len(data) != size:
            raise ValueError(f"the shard ends inside this sample ({len(data)} of {size} bytes)")
        return np.frombuffer(bytearray(data), dtype=np.uint8)  # writable: torch takes it without a copy

    def subset(self, index: np.ndarray) -> ShardImages:
        """The samples at ``index`` (M,) int, in that order."""
        return ShardImages(
            self.paths[index], self.labels[torch.as_tensor(index, dtype=torch.long)], self.classes, self.image_size,
            self.shards, self.shard_of[index], self.offsets[index], self.sizes[index], self.channels, self.bad_images,
            self.decode, self.image_exts, self.skipped,
        )

    def head(self, n: int) -> ShardImages:
        return ShardImages(
            self.paths[:n], self.labels[:n], self.classes, self.image_size, self.shards, self.shard_of[:n],
            self.offsets[:n], self.sizes[:n], self.channels, self.bad_images, self.decode, self.image_exts,
            self.skipped,
        )


class WebDatasetConfig(DataConfig):
    """``webdataset``'s own keys: where the shards are and which entries hold the image and label."""

    # the training shards: /data/shards-{000000..000127}.tar (braces expand, "::" joins patterns)
    urls: Optional[str] = None
    test_urls: Optional[str] = None  # the test split's shards; None: the training shards serve both splits
    image_key: str = "jpg;jpeg;png;webp"  # a sample's image: its first entry with one of these extensions
    label_key: Optional[str] = "cls"  # its label: an integer class index or a class name; None: no labels


@DATASETS.register("webdataset", config=WebDatasetConfig)
def webdataset(cfg: WebDatasetConfig, split: str) -> ShardImages:
    """WebDataset tar shards (see the module docstring): ``data.urls`` for training,
    ``data.test_urls`` (or the same shards) for evaluation. ``data.image_size`` is required."""
    if cfg.urls is None:
        raise UserError("dataset 'webdataset' needs data.urls=<shard files, e.g. /data/shards-{000000..000127}.tar>")
    if cfg.image_size is None:
        raise UserError("dataset 'webdataset' needs data.image_size=<side in pixels> (e.g. 224)")
    urls = cfg.test_urls if split == "test" and cfg.test_urls is not None else cfg.urls
    return ShardImages.open(urls, cfg.image_size, image_key=cfg.image_key, label_key=cfg.label_key,
                            channels=cfg.channels, bad_images=cfg.bad_images, decode=cfg.decode)
