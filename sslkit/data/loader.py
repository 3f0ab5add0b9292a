"""Batches of ``(uint8 images (b, C, H, W), int64 labels (b,))`` on the device, for the
training loop and for feature extraction, split across processes.

The order depends only on ``(seed, epoch)``: there is no iterator state to checkpoint,
and resuming at epoch e with ``set_epoch(e)`` replays exactly the same batches.
"""

from __future__ import annotations

import math
from typing import Iterator, Union

import torch

from sslkit.data.datasets import Dataset, ImageData

Device = Union[str, torch.device]


class Batches:
    """One process's batches of ``data``; build with ``make_batches``.

    Shuffled (training): each epoch draws one permutation from ``seed + epoch``, identical on
    every rank; step i takes the global batch ``perm[i*g:(i+1)*g]`` with
    ``g = batch_size * world_size``, and rank r its r-th part. So one process with batch 2B
    sees exactly the global batches that two processes with batch B see together, and
    every rank has the same number of steps. Without ``drop_last`` the last global batch is
    short and split as evenly as possible (a rank gets an empty batch when it holds fewer
    than ``world_size`` samples; train with ``drop_last=True``).

    Not shuffled (evaluation): rank r walks its contiguous shard
    ``arange(N).tensor_split(world_size)[r]`` in order, so every sample is seen exactly once
    across ranks and gathering the ranks' outputs in rank order restores the dataset order.
    Shards differ by at most one sample, so ranks may differ by one batch: gather once at
    the end (padded), not per batch.
    """

    def __init__(
        self,
        data: Dataset,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        rank: int,
        world_size: int,
        device: Device,
        num_workers: int,
    ) -> None:
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.epoch = 0
        self.num_samples = len(data)
        self._check_not_empty()
        if isinstance(data, ImageData):
            data = data.to(self.device)  # a no-op when the caller already moved it
            self._images, self._labels = data.images, data.labels
            self._loader = None
        else:
            self._loader = torch.utils.data.DataLoader(
                data,
                batch_sampler=_BatchSampler(self),
                num_workers=num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=num_workers > 0,  # no re-fork of the decoders every epoch
            )

    def _check_not_empty(self) -> None:
        """Raise on every rank alike (one rank raising alone would hang the others)."""
        if self.num_samples == 0:
            raise ValueError("the dataset is empty: check data.root and data.train_limit/test_limit")
        # Shuffled, a step needs a global batch; in order, the smallest shard needs a batch.
        have = self.num_samples if self.shuffle else self.num_samples // self.world_size
        need = self.batch_size * self.world_size if self.shuffle else self.batch_size
        if self.drop_last and have < need:
            raise ValueError(
                f"{self.num_samples} samples over {self.world_size} process(es) make no full batch of "
                f"{self.batch_size} per process with drop_last=True: lower the batch size, "
                "use more data (data.train_limit/test_limit), or set drop_last=False"
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields (call before each epoch)."""
        self.epoch = epoch

    def _shard(self) -> torch.Tensor:
        """Without shuffle: this rank's contiguous sample indices."""
        return torch.arange(self.num_samples).tensor_split(self.world_size)[self.rank]

    def __len__(self) -> int:
        if self.shuffle:
            n, size = self.num_samples, self.batch_size * self.world_size
        else:
            n, size = len(self._shard()), self.batch_size
        return n // size if self.drop_last else math.ceil(n / size)

    def indices(self) -> list[torch.Tensor]:
        """This rank's sample indices, one (b,) int64 CPU tensor per batch of the current epoch."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.num_samples, generator=gen)
            size = self.batch_size * self.world_size
            return [perm[i * size : (i + 1) * size].tensor_split(self.world_size)[self.rank] for i in range(len(self))]
        return list(self._shard().split(self.batch_size))[: len(self)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is not None:
            for images, labels in self._loader:
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            return
        batches = self.indices()
        if not batches:
            return
        # One host-to-device copy of the epoch's indices, then pure device indexing.
        flat = torch.cat(batches).to(self.device)
        for idx in flat.split([len(b) for b in batches]):
            yield self._images.index_select(0, idx), self._labels.index_select(0, idx)


class _BatchSampler:
    """Feeds a DataLoader the batches of the owning ``Batches``' current epoch."""

    def __init__(self, batches: Batches) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return (idx.tolist() for idx in self.batches.indices())

    def __len__(self) -> int:
        return len(self.batches)


def make_batches(
    data: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device: Device = "cpu",
    num_workers: int = 0,
) -> Batches:
    """Batches of ``data`` for process ``rank`` of ``world_size``; ``batch_size`` is per process.

    An ``ImageData`` is moved to ``device`` once (pass ``data.to(device)`` to several calls to
    share one copy) and batches are device-side indexing; ``num_workers`` is unused for it.
    A map-style dataset goes through a DataLoader with ``num_workers`` decoding workers,
    pinned memory on CUDA and non-blocking copies. See ``Batches`` for the order.
    """
    return Batches(
        data,
        batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        seed=seed,
        rank=rank,
        world_size=world_size,
        device=device,
        num_workers=num_workers,
    )
