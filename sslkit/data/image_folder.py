"""ImageNet-style folders of image files, decoded per item by loader workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision.io as tio
import torchvision.transforms.v2.functional as TF

from sslkit.config import DataConfig
from sslkit.data.datasets import DATASETS

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # what torchvision.io.decode_image reads
_SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val")}  # ImageNet calls its test split "val"


class ImageFolder(torch.utils.data.Dataset):
    """Image files as ``(uint8 (C, S, S), label)`` items; build one with ``ImageFolder.scan``.

    Each image is decoded (RGB, or grayscale with ``channels=1``), its shorter side resized
    to ``image_size`` (antialiased) and centre-cropped to a square.
    """

    def __init__(
        self, paths: np.ndarray, labels: torch.Tensor, classes: list[str], image_size: int, channels: int = 3
    ) -> None:
        # A numpy string array, not a list of str: forked workers reading Python objects
        # touch their refcounts and copy the pages, growing memory by the list's size each.
        self.paths = paths  # (N,) str
        self.labels = labels  # (N,) int64
        self.classes = classes
        self.image_size = image_size
        self.channels = channels

    @classmethod
    def scan(cls, folder: Path, image_size: int, channels: int = 3) -> ImageFolder:
        """``folder/<class>/**/*.jpg|jpeg|png|webp``; classes are the sorted subfolder names."""
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        paths: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            found = sorted(
                str(p) for p in (folder / name).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()
            )
            paths += found
            labels += [label] * len(found)
        if not paths:
            raise ValueError(
                f"no images in {folder}: expected {folder}/<class>/<image> with extensions "
                f"{', '.join(IMG_EXTENSIONS)}; found {len(classes)} class folders"
            )
        return cls(np.array(paths), torch.tensor(labels, dtype=torch.int64), classes, image_size, channels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = str(self.paths[index])
        mode = tio.ImageReadMode.RGB if self.channels == 3 else tio.ImageReadMode.GRAY
        try:
            image = tio.decode_image(tio.read_file(path), mode=mode)  # (C, H, W) uint8
        except RuntimeError as err:
            raise ValueError(f"cannot decode image {path}: {err}") from err
        image = TF.resize(image, self.image_size, antialias=True)  # shorter side -> S
        image = TF.center_crop(image, [self.image_size, self.image_size])  # (C, S, S)
        return image.contiguous(), int(self.labels[index])

    def head(self, n: int) -> ImageFolder:
        """The first ``n`` samples (in class order, so a small ``n`` covers few classes)."""
        return ImageFolder(self.paths[:n], self.labels[:n], self.classes, self.image_size, self.channels)


@DATASETS.register("image_folder")
def image_folder(cfg: DataConfig, split: str) -> ImageFolder:
    """``data.root/<split>/<class>/...`` (test also accepts ``val/``, as in ImageNet).

    When ``data.root`` has none of ``train/``, ``test/``, ``val/``, it is taken as the class
    folder itself and both splits are the same images (k-NN then scores on training images).
    ``data.image_size`` is required: files differ in size, batches do not.
    """
    if cfg.root is None:
        raise ValueError("dataset 'image_folder' needs data.root=<folder with train/<class>/... or <class>/...>")
    if cfg.image_size is None:
        raise ValueError("dataset 'image_folder' needs data.image_size=<side in pixels> (e.g. 224)")
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} is not a folder")
    split_dirs = [root / name for names in _SPLIT_FOLDERS.values() for name in names if (root / name).is_dir()]
    if not split_dirs:
        return ImageFolder.scan(root, cfg.image_size, cfg.channels)
    for name in _SPLIT_FOLDERS[split]:
        if (root / name).is_dir():
            return ImageFolder.scan(root / name, cfg.image_size, cfg.channels)
    raise FileNotFoundError(
        f"{root} has split folders ({', '.join(d.name for d in split_dirs)}) but none for the "
        f"{split} split: expected {' or '.join(str(root / n) for n in _SPLIT_FOLDERS[split])}"
    )
