"""Datasets (a registry of loaders) and device-side batching."""

from sslkit.data.datasets import DATASETS, ImageData, data_config, item_keys, load_dataset, match_channels
from sslkit.data.image_folder import ImageFolder  # importing registers "image_folder"
from sslkit.data.loader import Batches, make_batches

__all__ = [
    "DATASETS", "Batches", "ImageData", "ImageFolder", "data_config", "item_keys", "load_dataset", "make_batches",
    "match_channels",
]
