"""Datasets (a registry of loaders) and device-side batching."""

from sslkit.data.datasets import (
    DATASETS, ImageData, data_config, describe, describe_line, item_keys, load_dataset, match_channels,
)
from sslkit.data.image_folder import ImageFolder  # importing registers "image_folder"
from sslkit.data import file_list, hf, shards  # noqa: F401  (importing registers "file_list", "hf", "webdataset")
from sslkit.data.loader import Batch, Batches, make_batches

__all__ = [
    "DATASETS", "Batch", "Batches", "ImageData", "ImageFolder", "data_config", "describe", "describe_line",
    "item_keys", "load_dataset", "make_batches", "match_channels",
]
