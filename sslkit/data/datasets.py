"""In-memory datasets and the dataset registry.

A data source is a function ``(cfg, split: str) -> ImageData | ImageFolder`` registered in
``DATASETS`` (see there for how to add one); ``load_dataset`` looks it up and applies the
config's limits and channel count. Small datasets come back as ``ImageData`` (one uint8
tensor, meant to live whole on the device); large ones as a map-style
``torch.utils.data.Dataset`` that decodes per item (see ``sslkit.data.image_folder``).

Files are looked for, in order, in ``data.root``, ``$SSLKIT_DATA/<dataset>``,
``$SSLKIT_DATA``, ``/usr/share/datasets/<dataset>`` (Debian's ``dataset-*`` packages) and
the download cache; torchvision downloads only when ``data.download`` is true.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from sslkit.errors import UserError
from sslkit.augment.ops import rgb_to_grayscale
from sslkit.config import DataConfig, resolve_kind
from sslkit.registry import Registry

if TYPE_CHECKING:
    from sslkit.data.image_folder import ImageFolder

SPLITS = ("train", "test")
SYSTEM_DATA_DIR = Path("/usr/share/datasets")  # where Debian's dataset-* packages install
CACHE_DIR = Path.home() / ".cache" / "sslkit"  # torchvision downloads land here when data.root is unset
BAD_IMAGES = ("error", "skip")  # the values of data.bad_images


@dataclass
class ImageData:
    """A small dataset held whole in memory (or on the device)."""

    images: torch.Tensor  # (N, C, H, W) uint8, C = 1 or 3
    labels: torch.Tensor  # (N,) int64
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be ({len(self.images)},), got {tuple(self.labels.shape)}")

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def __len__(self) -> int:
        return len(self.images)

    def head(self, n: int) -> ImageData:
        """The first ``n`` samples (views, no copy)."""
        return ImageData(self.images[:n], self.labels[:n], self.num_classes)

    def subset(self, index: np.ndarray) -> ImageData:
        """The samples at ``index`` (M,) int, in that order."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.images.device)
        return ImageData(self.images[index], self.labels[index.to(self.labels.device)], self.num_classes)

    def to(self, device: Union[str, torch.device]) -> ImageData:
        """Move once to ``device`` and pass the result to several ``make_batches`` to share one copy."""
        return ImageData(self.images.to(device), self.labels.to(device), self.num_classes)


Dataset = Union[ImageData, "ImageFolder"]
DATASETS: Registry[Callable[[DataConfig, str], Dataset]] = Registry("dataset", base_config=DataConfig)
"""Data sources by ``data.name``. A source is a function ``(cfg, split) -> dataset``, ``split``
"train" or "test", registered with its config class, a ``DataConfig`` subclass declared beside
it with the source's own keys (the base's keys: root, download, image_size, channels, limits,
num_workers, bad_images, decode)::

    class MyConfig(DataConfig):
        label_column: Optional[str] = None  # the source's own key, with its default

    @DATASETS.register("my_source", config=MyConfig)
    def my_source(cfg: MyConfig, split: str) -> Dataset:
        ...

A source without keys of its own registers without ``config`` (``DATASETS.register("cifar10")``).
The recipe's ``data:`` section (and ``eval.data``) is validated by the named source's class, so a
key of another source is a one-line error listing this one's keys. The dataset it returns is an
``ImageData``, or a map-style dataset with ``__len__``, ``head(n)``, ``num_classes`` (0: no
labels; its labels are then -1) and ``load(index) -> (uint8 image, label, bad)`` as
``ImageFolder``'s; ``describe(data)`` is what the run's first line says about it.
"""


def data_config(name: str, **keys: Any) -> DataConfig:
    """The config of data source ``name`` with ``keys``, its own keys included
    (``data_config("image_folder", root="photos", image_size=64, labels="none")``)."""
    return DATASETS.config(name)(name=name, **keys)


def item_keys(data: Dataset, name: str, split: str) -> Sequence[str]:
    """The path or key of each sample of ``data``, in index order (``sslkit embed``'s items.txt).

    A dataset names its own samples with an ``item_keys()`` method where it can (``ImageFolder``:
    each image's file path); in-memory arrays have none and get ``<name>/<split>/<index>``,
    e.g. ``fashion_mnist/train/000123`` (at least 6 digits, so the keys sort in index order).
    """
    own = getattr(data, "item_keys", None)
    if own is not None:
        return own()
    width = max(6, len(str(len(data) - 1)))
    return [f"{name}/{split}/{i:0{width}d}" for i in range(len(data))]


def check_bad_images(value: str) -> None:
    if value not in BAD_IMAGES:
        raise UserError(
            f"data.bad_images must be one of {', '.join(BAD_IMAGES)} (error: stop at an undecodable image "
            f"file, naming it; skip: count it and use the next image), got {value!r}"
        )


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(..., C, H, W) uint8 -> (..., channels, H, W): 1 -> 3 is a free ``expand`` view, 3 -> 1
    is ``sslkit.augment.rgb_to_grayscale`` (ITU-R 601 luma, rounded), as every decoder does."""
    have = images.shape[-3]
    if have == channels:
        return images
    if (have, channels) == (1, 3):
        return images.expand(*images.shape[:-3], 3, *images.shape[-2:])
    if (have, channels) == (3, 1):
        return rgb_to_grayscale(images)
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels (only 1 <-> 3)")


def load_dataset(cfg: DataConfig, split: str) -> Dataset:
    """The ``split`` ("train" or "test") of dataset ``cfg.name``, limited and channel-matched.

    ``train_limit``/``test_limit`` keep the first N samples. Channels: with
    ``cfg.channels == 1`` RGB data is converted to grayscale here. With
    ``cfg.channels == 3`` a grayscale ``ImageData`` (Fashion-MNIST) stays 1-channel, a third
    of the memory; consumers call ``match_channels(batch, cfg.channels)`` on the device,
    which is a free view (the augmentation pipeline and feature extraction do).
    Map-style datasets decode straight to ``cfg.channels``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cfg = resolve_kind("data", cfg, cfg.name)  # a base DataConfig naming a source with keys of its own
    limit = cfg.train_limit if split == "train" else cfg.test_limit  # DataConfig has checked the values
    data = DATASETS.get(cfg.name)(cfg, split)
    if len(data) == 0:
        raise UserError(f"the {split} split of dataset {cfg.name!r} is empty: check its files and data.root")
    if limit is not None:
        data = data.head(limit)
    if isinstance(data, ImageData) and cfg.channels == 1 and data.channels == 3:
        # Chunks bound the float temporaries to a few hundred MB on large sets.
        gray = torch.cat([match_channels(chunk, 1) for chunk in data.images.split(8192)])
        data = ImageData(gray, data.labels, data.num_classes)
    return data


_SKIPPED = {"hidden": "hidden", "not_image": "non-image", "missing": "missing", "loose": "loose",
            "damaged_shards": "damaged shard"}


def describe(data: Dataset, cfg: DataConfig) -> dict[str, Any]:
    """What a run's start event records about a loaded split: source, labels mode (``folders``,
    ``column``, ``none``; ``dataset`` for a labelled built-in set), images, classes and the
    files skipped while listing them (hidden, non-image, missing, loose)."""
    info = getattr(data, "info", {})
    return {"source": cfg.name, "labels": info.get("labels", "dataset"), "images": len(data),
            "classes": data.num_classes, **({"skipped": info["skipped"]} if info.get("skipped") else {})}


def describe_line(summary: dict[str, Any], cfg: DataConfig) -> str:
    """``describe``'s summary as the run's first line, e.g. ``image_folder photos: 300 images, no
    labels (data.labels=auto -> none); skipped 2 hidden, 1 non-image file(s)``."""
    where = f" {cfg.root}" if cfg.root else ""
    chosen = getattr(cfg, "labels", None)
    resolved = f" -> {summary['labels']}" if chosen == "auto" else ""
    how = f" (data.labels={chosen}{resolved})" if chosen else ""
    labels = f"{summary['classes']} classes" if summary["classes"] else "no labels"
    line = f"{summary['source']}{where}: {summary['images']} images, {labels}{how}"
    skipped = summary.get("skipped", {})
    if skipped:
        line += "; skipped " + ", ".join(f"{n} {_SKIPPED.get(k, k)}" for k, n in skipped.items()) + " file(s)"
    return line


# ---------------------------------------------------------------------------------------
# Finding files


def _search_dirs(cfg: DataConfig, dataset_dir: str) -> list[Path]:
    """Base folders to look in, in order; ``dataset_dir`` is the dataset's folder name."""
    env = os.environ.get("SSLKIT_DATA")
    bases = [Path(cfg.root)] if cfg.root else []
    if env:
        bases += [Path(env) / dataset_dir, Path(env)]
    bases += [SYSTEM_DATA_DIR / dataset_dir, CACHE_DIR]
    return bases


def _locate(
    cfg: DataConfig,
    *,
    title: str,
    dataset_dir: str,
    layouts: tuple[str, ...],
    found: Callable[[Path], bool],
    download: Callable[[Path], None],
    how_to_get: str,
) -> Path:
    """The first ``base/layout`` folder where ``found`` holds, downloading if allowed, or a
    FileNotFoundError that lists every folder looked in and how to get the data."""
    looked: list[Path] = []
    for base in _search_dirs(cfg, dataset_dir):
        for layout in layouts:
            folder = base / layout
            if found(folder):
                return folder
            looked.append(folder)
    download_root = Path(cfg.root) if cfg.root else CACHE_DIR
    problem = ""
    if cfg.download:
        print(f"sslkit: downloading {title} to {download_root} (data.download=true)", flush=True)
        try:
            download(download_root)
        except Exception as err:  # offline, proxy, disk full: report it with the places looked in
            problem = f"\nThe download into {download_root} failed: {err}"
        else:
            for layout in layouts:
                if found(download_root / layout):
                    return download_root / layout
            problem = f"\nThe download into {download_root} did not produce the expected files."
    places = "\n".join(f"  {p}" for p in looked)
    if not os.environ.get("SSLKIT_DATA"):
        places += "\n  ($SSLKIT_DATA is not set)"
    raise UserError(
        f"{title} not found. Looked in:\n{places}{problem}\nTo get it: {how_to_get}; "
        f"or put the files in a folder and set SSLKIT_DATA=<folder> (or data.root=<folder>)"
        + ("" if cfg.download else "; or, with internet access, pass data.download=true")
        + "."
    )


# ---------------------------------------------------------------------------------------
# Fashion-MNIST (idx files)

_FASHION_MNIST_REMEDY = (
    "delete it and get it again: pass data.download=true (torchvision), or reinstall "
    "dataset-fashion-mnist (`apt-get install --reinstall dataset-fashion-mnist`)"
)


def read_idx(path: Path, remedy: str = "replace it with a good copy") -> np.ndarray:
    """An idx file (``.gz`` or not) as a numpy array of its declared shape; a damaged file,
    or one of another format, is a ValueError naming it and ending with ``remedy``."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:  # not gzip, cut short, corrupt deflate data
            raise UserError(f"{path} is not a readable gzip file ({err}): {remedy}") from err
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte idx file (its first bytes are {raw[:4]!r}): {remedy}")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise UserError(f"{path} ends inside its idx header ({len(raw)} bytes): {remedy}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if len(raw) - offset != int(np.prod(shape)):
        raise UserError(
            f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes) but holds "
            f"{len(raw) - offset} bytes (truncated or damaged): {remedy}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Optional[Path]:
    """``folder/stem.gz`` or the unzipped ``folder/stem`` (torchvision keeps both)."""
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.is_file():
            return path
    return None


def _fashion_mnist_stems(split: str) -> tuple[str, str]:
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _torchvision_download(cls_name: str, split: str) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        import torchvision.datasets

        getattr(torchvision.datasets, cls_name)(root=str(root), train=split == "train", download=True)

    return download


@DATASETS.register("fashion_mnist")
def fashion_mnist(cfg: DataConfig, split: str) -> ImageData:
    """Fashion-MNIST: 60k train / 10k test, 1 x 28 x 28, 10 classes."""
    stems = _fashion_mnist_stems(split)
    folder = _locate(
        cfg,
        title=f"Fashion-MNIST ({split} split: {', '.join(s + '.gz' for s in stems)})",
        dataset_dir="fashion-mnist",
        layouts=(".", "FashionMNIST/raw"),  # Debian's flat folder; torchvision's root
        found=lambda d: all(_idx_file(d, s) for s in stems),
        download=_torchvision_download("FashionMNIST", split),
        how_to_get="as root, `apt-get install dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist)",
    )
    image_path, label_path = _idx_file(folder, stems[0]), _idx_file(folder, stems[1])
    images = read_idx(image_path, _FASHION_MNIST_REMEDY)  # (N, 28, 28)
    labels = read_idx(label_path, _FASHION_MNIST_REMEDY)  # (N,)
    if images.ndim != 3 or labels.ndim != 1:
        wrong = image_path if images.ndim != 3 else label_path
        raise UserError(
            f"{wrong} holds an array of shape {images.shape if images.ndim != 3 else labels.shape}, not "
            f"{'images (N, H, W)' if images.ndim != 3 else 'labels (N,)'}: the image and label files may be "
            f"swapped or of another dataset; {_FASHION_MNIST_REMEDY}"
        )
    if len(images) != len(labels) or len(images) == 0:
        raise UserError(
            f"{image_path} holds {len(images)} images and {label_path} {len(labels)} labels: "
            f"one of them is from another release or damaged; {_FASHION_MNIST_REMEDY}"
        )
    return ImageData(
        torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), num_classes=10
    )


# ---------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision's pickled python batches)


def _read_cifar(
    folder: Path, files: list[str], label_key: str, remedy: str = "replace it with a good copy"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batches; a damaged file, or one of another format, is a ValueError
    naming it and ending with ``remedy``."""
    images, labels = [], []
    for name in files:
        path = folder / name
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")  # the files are python-2 pickles
        except Exception as err:  # truncated or foreign bytes raise all sorts while unpickling
            raise UserError(
                f"{path} is not a readable CIFAR batch (truncated or of another format: "
                f"{type(err).__name__}: {err}): {remedy}"
            ) from err
        if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
            keys = sorted(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__
            raise UserError(
                f"{path} is not a CIFAR batch with 'data' and '{label_key}' (it holds {keys}): "
                f"is it from the other CIFAR? {remedy}"
            )
        data = np.asarray(batch["data"])
        batch_labels = np.asarray(batch[label_key])
        shape_ok = data.ndim == 2 and data.shape[1] == 3 * 32 * 32 and batch_labels.shape == (len(data),)
        if not shape_ok or not np.issubdtype(data.dtype, np.integer):
            raise UserError(
                f"{path}: 'data' is {data.dtype} {data.shape} with {batch_labels.shape} labels, not uint8 "
                f"(N, 3072) with (N,) labels: {remedy}"
            )
        images.append(data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32))
        labels.append(batch_labels.astype(np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _cifar(cfg: DataConfig, split: str, classes: int) -> ImageData:
    if classes == 10:
        folder_name, label_key, cls_name = "cifar-10-batches-py", "labels", "CIFAR10"
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        folder_name, label_key, cls_name = "cifar-100-python", "fine_labels", "CIFAR100"
        files = [split]
    how_to_get = (
        f"download cifar-{classes}-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
        f"and unpack it, which makes {folder_name}/"
    )
    folder = _locate(
        cfg,
        title=f"CIFAR-{classes} ({split} split: {folder_name}/{{{','.join(files)}}})",
        dataset_dir=f"cifar-{classes}",
        layouts=(folder_name,),
        found=lambda d: all((d / f).is_file() for f in files),
        download=_torchvision_download(cls_name, split),
        how_to_get=how_to_get,
    )
    remedy = f"delete {folder} and get it again: {how_to_get}, or pass data.download=true"
    images, labels = _read_cifar(folder, files, label_key, remedy)  # (N, 3, 32, 32), (N,)
    return ImageData(images, labels, num_classes=classes)


@DATASETS.register("cifar10")
def cifar10(cfg: DataConfig, split: str) -> ImageData:
    """CIFAR-10: 50k train / 10k test, 3 x 32 x 32, 10 classes."""
    return _cifar(cfg, split, 10)


@DATASETS.register("cifar100")
def cifar100(cfg: DataConfig, split: str) -> ImageData:
    """CIFAR-100 (fine labels): 50k train / 10k test, 3 x 32 x 32, 100 classes."""
    return _cifar(cfg, split, 100)


# ---------------------------------------------------------------------------------------
# Synthetic


@DATASETS.register("synthetic")
def synthetic(cfg: DataConfig, split: str) -> ImageData:
    """Deterministic random RGB images for tests: each of 10 classes has its own smooth
    colour pattern, and samples are that pattern plus per-pixel noise, so raw-pixel k-NN
    is far above chance while the task is not trivial for a single pixel.

    ``train_limit``/``test_limit`` (default 512/256) set N, ``image_size`` (default 32) the side.
    """
    num_classes = 10
    n = (cfg.train_limit if split == "train" else cfg.test_limit) or (512 if split == "train" else 256)
    size = cfg.image_size or 32
    # Prototypes come from one seed so that train and test share them; samples from per-split seeds.
    proto_gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=proto_gen)  # (K, 3, 4, 4) in [0, 1)
    protos = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    protos = 40 + 175 * protos  # (K, 3, S, S), away from 0/255 so noise is not clipped much
    gen = torch.Generator().manual_seed(1 + SPLITS.index(split))
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]  # (N,) balanced
    noise = 40 * torch.randn(n, 3, size, size, generator=gen)
    images = (protos[labels] + noise).round_().clamp_(0, 255).to(torch.uint8)  # (N, 3, S, S)
    return ImageData(images, labels, num_classes)
