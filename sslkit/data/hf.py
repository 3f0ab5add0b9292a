"""Local Hugging Face datasets: a folder written by ``save_to_disk``, or parquet files.

``data.name=hf data.root=<folder or .parquet file> data.image_column=image
data.label_column=label``. The images are read as their stored bytes (the ``Image`` feature
with ``decode=False``, or a binary column, or a column of file paths) and decoded by sslkit's
own decoders, as image files in a folder are: the same JPEG gives the same pixels from a
folder, shards or a table, and a row that does not decode follows ``data.bad_images``.
Rows are random-access (memory-mapped Arrow), so ``Batches`` gives its guarantees (order from
``(seed, epoch)``, exact resume, each row once per epoch over processes).

Splits: a ``DatasetDict`` folder gives ``train`` for training and ``test`` (or
``validation``, ``val``) for evaluation; parquet files are split by their names
(``train-00000-of-00004.parquet``, ``data/test/...``), and a single ``Dataset`` (or parquet
files without split names) serves both splits. Parquet files are converted once into the
``datasets`` cache (``$HF_DATASETS_CACHE``), as ``datasets`` does.

Nothing is downloaded: ``data.root`` must exist, unless ``data.download=true``, when a
``data.root`` that is not a path is taken as a Hub dataset name and ``datasets.load_dataset``
fetches it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sslkit.config import DataConfig
from sslkit.data.datasets import DATASETS
from sslkit.data.image_folder import ImageFolder
from sslkit.errors import UserError

SPLIT_NAMES = {"train": ("train",), "test": ("test", "validation", "val")}  # the names each split accepts
_INSTALL = "pip install 'sslkit[hf]' (or pip install datasets)"


def import_datasets() -> Any:
    """The ``datasets`` module, or one line saying how to install it."""
    try:
        import datasets
    except ImportError as err:
        raise UserError(f"data.name=hf needs the Hugging Face datasets library: {_INSTALL}") from err
    return datasets


def _split_of(path: Path, root: Path) -> Optional[str]:
    """The split a parquet file belongs to by its name (``train-0000.parquet``, ``test/x.parquet``)."""
    parts = [*path.relative_to(root).parent.parts, path.name]
    for split, names in SPLIT_NAMES.items():
        for part in parts:
            if re.split(r"[-_.]", part.lower(), maxsplit=1)[0] in names:
                return split
    return None


def load_rows(root: str, split: str, download: bool) -> Any:
    """The ``datasets.Dataset`` of ``split`` at ``root`` (see the module docstring)."""
    datasets = import_datasets()
    path = Path(root)
    if not path.exists():
        if download:
            return datasets.load_dataset(root, split=_hub_split(datasets.get_dataset_split_names(root), split, root))
        raise UserError(
            f"data.root {root} does not exist: give a folder written by save_to_disk or parquet files "
            "(or, to fetch a Hub dataset of this name, pass data.download=true)"
        )
    if path.is_file() or not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
        if not files or any(f.suffix != ".parquet" for f in files):
            raise UserError(
                f"data.root {root} is neither a folder written by save_to_disk (no dataset_info.json or "
                "dataset_dict.json in it) nor parquet files: point it at one of these"
            )
        if path.is_file():  # one file serves both splits
            return datasets.Dataset.from_parquet(str(path))
        named = [f for f in files if _split_of(f, path) == split]
        if not named and any(_split_of(f, path) is not None for f in files):
            have = sorted({s for f in files if (s := _split_of(f, path)) is not None})
            raise UserError(
                f"the parquet files under {root} have split(s) {', '.join(have)} by their names but none for the "
                f"{split} split ({' or '.join(SPLIT_NAMES[split])}): add them, or give one file as data.root"
            )
        return datasets.Dataset.from_parquet([str(f) for f in (named or files)])
    rows = datasets.load_from_disk(str(path))
    if isinstance(rows, datasets.DatasetDict):
        return rows[_hub_split(list(rows), split, root)]
    return rows


def _hub_split(have: list[str], split: str, root: str) -> str:
    for name in SPLIT_NAMES[split]:
        if name in have:
            return name
    raise UserError(
        f"{root} has split(s) {', '.join(have)} but none for the {split} split "
        f"({' or '.join(SPLIT_NAMES[split])}): save one under that name"
    )


def _check_column(rows: Any, column: str, key: str, root: str) -> None:
    if column not in rows.column_names:
        guess = [c for c in rows.column_names if c in ("image", "img", "label", "labels")]
        hint = f" (e.g. {key}={guess[0]})" if guess else ""
        raise UserError(
            f"{key}={column!r} is not a column of {root} (its columns: {', '.join(rows.column_names)}): "
            f"set {key} to one of them{hint}"
        )


def _labels(rows: Any, column: Optional[str]) -> tuple[torch.Tensor, list[str]]:
    """``(labels (N,) int64, classes)``: a ClassLabel column's names, integers as indices
    ``0..max``, other values as sorted class names; a missing value -1; no column: all -1."""
    if column is None:
        return torch.full((len(rows),), -1, dtype=torch.int64), []
    feature = rows.features[column]
    values = rows.with_format("arrow")[column].to_pylist()
    if hasattr(feature, "names"):  # ClassLabel
        return torch.tensor([-1 if v is None else v for v in values], dtype=torch.int64), list(feature.names)
    present = [v for v in values if v is not None]
    if all(isinstance(v, int) and v >= 0 for v in present):
        top = max(present, default=-1)
        indices = torch.tensor([-1 if v is None else v for v in values], dtype=torch.int64)
        return indices, [str(i) for i in range(top + 1)]
    classes = sorted({str(v) for v in present})
    lookup = {name: i for i, name in enumerate(classes)}
    return torch.tensor([-1 if v is None else lookup[str(v)] for v in values], dtype=torch.int64), classes


class TableImages(ImageFolder):
    """The rows of a Hugging Face ``datasets.Dataset`` as ``ImageFolder`` items; build with
    ``TableImages.open``. ``paths`` names each row ``<root>[<split>][<row>]``."""

    def __init__(
        self,
        rows: Any,
        column: str,
        paths: np.ndarray,
        labels: torch.Tensor,
        classes: list[str],
        image_size: int,
        channels: int = 3,
        bad_images: str = "error",
        decode: str = "workers",
    ) -> None:
        info = {"labels": "column" if classes else "none"}
        super().__init__(paths, labels, classes, image_size, channels, bad_images, decode, info)
        self.rows = rows  # a datasets.Dataset of the image column alone, undecoded
        self.column = column

    @classmethod
    def open(
        cls,
        root: str,
        split: str,
        image_size: int,
        *,
        image_column: str = "image",
        label_column: Optional[str] = None,
        download: bool = False,
        channels: int = 3,
        bad_images: str = "error",
        decode: str = "workers",
    ) -> TableImages:
        datasets = import_datasets()
        rows = load_rows(root, split, download)
        _check_column(rows, image_column, "data.image_column", root)
        if label_column is not None:
            _check_column(rows, label_column, "data.label_column", root)
        labels, classes = _labels(rows, label_column)
        images = rows.select_columns([image_column])
        if isinstance(images.features[image_column], datasets.Image):
            images = images.cast_column(image_column, datasets.Image(decode=False))  # bytes, not PIL images
        paths = np.array([f"{root}[{split}][{i}]" for i in range(len(rows))])
        return cls(images, image_column, paths, labels, classes, image_size, channels, bad_images, decode)

    def _raw(self, index: int) -> np.ndarray:
        cell = self.rows[int(index)][self.column]
        if isinstance(cell, dict):  # the Image feature: {"bytes": ..., "path": ...}
            cell = cell.get("bytes") or cell.get("path")
        if cell is None:
            raise ValueError(f"its {self.column!r} cell is empty")
        if isinstance(cell, str):
            return np.fromfile(cell, dtype=np.uint8)
        if not isinstance(cell, (bytes, bytearray)):
            raise ValueError(f"the {self.column!r} cell holds {type(cell).__name__}, not image bytes or a file path")
        return np.frombuffer(bytearray(cell), dtype=np.uint8)  # writable: torch takes it without a copy

    def subset(self, index: np.ndarray) -> TableImages:
        """The samples at ``index`` (M,) int, in that order."""
        return TableImages(
            self.rows.select(np.asarray(index).tolist()), self.column, self.paths[index],
            self.labels[torch.as_tensor(index, dtype=torch.long)], self.classes, self.image_size, self.channels,
            self.bad_images, self.decode,
        )

    def head(self, n: int) -> TableImages:
        return TableImages(
            self.rows.select(range(min(n, len(self)))), self.column, self.paths[:n], self.labels[:n], self.classes,
            self.image_size, self.channels, self.bad_images, self.decode,
        )


class HFConfig(DataConfig):
    """``hf``'s own keys: the columns that hold the image and the label (``data.root``: a folder
    written by ``save_to_disk`` or parquet files; ``data.download=true`` lets a Hub name fetch)."""

    image_column: str = "image"  # an Image feature, image bytes, or image file paths
    label_column: Optional[str] = None  # a ClassLabel, integer or text column; None: no labels


@DATASETS.register("hf", config=HFConfig)
def hf(cfg: HFConfig, split: str) -> TableImages:
    """A local Hugging Face dataset (see the module docstring). ``data.image_size`` is required."""
    if cfg.root is None:
        raise UserError("dataset 'hf' needs data.root=<folder written by save_to_disk, or parquet files>")
    if cfg.image_size is None:
        raise UserError("dataset 'hf' needs data.image_size=<side in pixels> (e.g. 224)")
    return TableImages.open(cfg.root, split, cfg.image_size, image_column=cfg.image_column,
                            label_column=cfg.label_column, download=cfg.download, channels=cfg.channels,
                            bad_images=cfg.bad_images, decode=cfg.decode)
