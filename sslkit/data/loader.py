"""Batches of ``(uint8 images (b, C, H, W), int64 labels (b,))`` on the device, for the
training loop and for feature extraction, split across processes. Each is a ``Batch``: it
unpacks as that pair and carries ``sizes``, each image file's own (height, width) before it
was resized whole to the batch's square (None for in-memory data), which the crops and the
evaluation transform use to see each image with its own aspect.

The order depends only on ``(seed, epoch)``: there is no iterator state to checkpoint,
and resuming at epoch e with ``set_epoch(e)`` replays exactly the same batches.

Image files that do not decode (``data.bad_images``) surface here, in the main process:
with ``error`` as one ``BadImageError`` naming the file, also from a decoding worker; with
``skip`` as a ``BadImageWarning`` once per file and the count ``Batches.bad_images``.

An image folder with ``data.decode=device`` is decoded here too: the workers send each
batch's JPEG files as bytes (one pinned buffer on CUDA), and the main process decodes them
on the device with ``ImageFolder.decode_jpegs`` (nvjpeg on CUDA), the batch's other files
coming decoded from the workers (see ``sslkit.data.image_folder``).
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Iterator, NamedTuple, Optional, Union

import torch

from sslkit.errors import UserError
from sslkit.data.datasets import Dataset, ImageData
from sslkit.data.image_folder import BadImageError, BadImageWarning, skip_message

Device = Union[str, torch.device]


class Batch(tuple):
    """``(images, labels)``: unpacks as that pair; ``sizes`` is (b, 2) int64 on the device, each
    image's own (height, width) before it was resized whole to ``images``' square (image
    files), or None when each image is its square as it is (in-memory data)."""

    sizes: Optional[torch.Tensor]

    def __new__(cls, images: torch.Tensor, labels: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> Batch:
        batch = super().__new__(cls, (images, labels))
        batch.sizes = sizes
        return batch


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

    ``bad_images``: how many samples of the batches yielded so far (since construction,
    over all epochs; this rank's only) came from an undecodable file replaced by the next
    image (``data.bad_images=skip``). Each such file is also warned about once, and
    ``skipped_files`` names them (as the dataset's ``item_keys`` do).
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
        self.epoch, self.start = 0, 0
        self.bad_images = 0
        self._warned: set[str] = set()
        self.num_samples = len(data)
        self._check_not_empty()
        self._data: Any = None  # an ImageFolder with decode="device": its decode_jpegs, here
        if isinstance(data, ImageData):
            data = data.to(self.device)  # a no-op when the caller already moved it
            self._images, self._labels = data.images, data.labels
            self._loader = None
        else:
            encoded = getattr(data, "decode", "workers") == "device"
            self._data = data if encoded else None
            self._loader = torch.utils.data.DataLoader(
                _Items(data, encoded),
                batch_sampler=_BatchSampler(self),
                collate_fn=_collate_encoded if encoded else _collate,
                num_workers=num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=num_workers > 0,  # no re-fork of the decoders every epoch
            )

    def _check_not_empty(self) -> None:
        """Raise on every rank alike (one rank raising alone would hang the others)."""
        if self.num_samples == 0:
            raise UserError("the dataset is empty: check data.root and data.train_limit/test_limit")
        # Shuffled, a step needs a global batch; in order, the smallest shard needs a batch.
        have = self.num_samples if self.shuffle else self.num_samples // self.world_size
        need = self.batch_size * self.world_size if self.shuffle else self.batch_size
        if self.drop_last and have < need:
            raise UserError(
                f"{self.num_samples} samples over {self.world_size} process(es) make no full batch of "
                f"{self.batch_size} per process with drop_last=True: lower the batch size, "
                "use more data (data.train_limit/test_limit), or set drop_last=False"
            )

    @property
    def skipped_files(self) -> frozenset[str]:
        """The undecodable files replaced so far (``data.bad_images=skip``), by path."""
        return frozenset(self._warned)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch whose order ``__iter__`` yields, from its batch ``start`` on (a run
        resumed mid-epoch skips the batches it has trained on without loading them)."""
        self.epoch, self.start = epoch, start

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
        """This rank's sample indices, one (b,) int64 CPU tensor per batch of the current epoch
        from batch ``start`` on."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.num_samples, generator=gen)
            size = self.batch_size * self.world_size
            return [perm[i * size : (i + 1) * size].tensor_split(self.world_size)[self.rank]
                    for i in range(self.start, len(self))]
        return list(self._shard().split(self.batch_size))[self.start : len(self)]

    def __iter__(self) -> Iterator[Batch]:
        if self._loader is not None:
            for batch in self._loader:
                if isinstance(batch, BadImageError):  # from a worker too: its own message, no worker traceback
                    error, batch = batch, None
                    try:
                        raise error
                    finally:  # no cycle error -> traceback -> this frame -> error: see _BatchSampler
                        error = None
                if isinstance(batch, _Encoded):
                    images, labels, bad, sizes = self._decode(batch)
                else:
                    images, labels, bad, sizes = batch
                    images = images.to(self.device, non_blocking=True)
                self._count(bad)
                yield Batch(images, labels.to(self.device, non_blocking=True), sizes.to(self.device, non_blocking=True))
            return
        batches = self.indices()
        if not batches:
            return
        # One host-to-device copy of the epoch's indices, then pure device indexing.
        flat = torch.cat(batches).to(self.device)
        for idx in flat.split([len(b) for b in batches]):
            yield Batch(self._images.index_select(0, idx), self._labels.index_select(0, idx))

    def _decode(self, batch: _Encoded) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]], torch.Tensor]:
        """A ``decode="device"`` batch as ``(images (b, C, S, S) on the device, labels, skipped files,
        sizes (b, 2))``."""
        b = len(batch.indices)
        labels, bad, sizes = batch.labels, list(batch.bad), batch.shapes
        slots: list[Optional[torch.Tensor]] = [None] * b
        if batch.pixels is not None:  # what the workers decoded: not JPEG, or not one for the device
            where = set(batch.where)
            others = [i for i in range(b) if i not in where]
            for i, image in zip(others, batch.pixels.to(self.device, non_blocking=True).unbind(0)):
                slots[i] = image
        if batch.where:
            jpegs = list(batch.jpegs.split(list(batch.sizes)))
            images, own, fallbacks = self._data.decode_jpegs(
                jpegs, [batch.indices[i] for i in batch.where], self.device)
            for i, image, size in zip(batch.where, images, own):
                slots[i] = image
                sizes[i] = torch.tensor(size)
            for k, label, skipped in fallbacks:  # decoded on the CPU, or replaced (bad_images=skip)
                labels[batch.where[k]] = label
                if skipped is not None:
                    bad.append(skipped)
        if b == 0:
            return torch.empty((0, self._data.channels, self._data.image_size, self._data.image_size),
                               dtype=torch.uint8, device=self.device), labels, bad, sizes
        return torch.stack(slots), labels, bad, sizes  # type: ignore[arg-type]

    def _count(self, bad: list[tuple[str, str]]) -> None:
        self.bad_images += len(bad)
        for path, reason in bad:
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(skip_message(path, reason), BadImageWarning, stacklevel=3)


class _Items(torch.utils.data.Dataset):
    """``data``'s items as ``(image, label, bad, size)``, ``bad`` a skipped file's ``(path, reason)``
    or None, ``size`` the image's own (height, width) (None: bytes to decode); an undecodable
    file under ``bad_images="error"`` comes back as its ``BadImageError`` (returned, not raised,
    so that a worker passes on the message alone).
    ``encoded``: items from ``data.read`` (JPEG bytes or pixels) with their index appended."""

    def __init__(self, data: Any, encoded: bool = False) -> None:
        self.data = data
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Union[tuple[Any, ...], BadImageError]:
        try:
            if self.encoded:
                return (*self.data.read(index), index)
            if hasattr(self.data, "load"):
                return self.data.load(index)
            image, label = self.data[index]
            return image, label, None, tuple(image.shape[-2:])
        except BadImageError as err:
            return err


def _collate(
    items: list[Any],
) -> Union[tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]], torch.Tensor], BadImageError]:
    """Stacked images, int64 labels, the skipped files and the (b, 2) sizes; or the batch's first error."""
    for item in items:
        if isinstance(item, BadImageError):
            return item
    collate = torch.utils.data.default_collate  # stacks into shared memory in a worker
    images = collate([item[0] for item in items])
    labels = collate([item[1] for item in items])
    sizes = torch.tensor([item[3] for item in items], dtype=torch.int64).view(-1, 2)
    return images, labels, [item[2] for item in items if item[2] is not None], sizes


class _Encoded(NamedTuple):
    """A batch of a ``decode="device"`` image folder, as the workers send it (the DataLoader
    pins its tensors on CUDA)."""

    jpegs: Optional[torch.Tensor]  # (total bytes,) uint8: the batch's JPEG files end to end
    sizes: tuple[int, ...]  # bytes of each JPEG file
    where: tuple[int, ...]  # batch position of each JPEG file
    pixels: Optional[torch.Tensor]  # (b - len(where), C, S, S) uint8: the other positions, decoded
    labels: torch.Tensor  # (b,) int64
    shapes: torch.Tensor  # (b, 2) int64: each image's own (height, width); 0 where the device decodes it
    bad: list[tuple[str, str]]  # files skipped by the workers
    indices: tuple[int, ...]  # (b,) dataset indices, for ImageFolder.load of a file the device refuses


def _collate_encoded(items: list[Any]) -> Union[_Encoded, BadImageError]:
    """``_Encoded`` from ``_Items(data, encoded=True)``; or the batch's first error."""
    for item in items:
        if isinstance(item, BadImageError):
            return item
    where = tuple(i for i, item in enumerate(items) if item[0].dim() == 1)  # items: (image, label, bad, size, index)
    others = [item[0] for item in items if item[0].dim() != 1]
    jpegs = [items[i][0] for i in where]
    return _Encoded(
        jpegs=_concat(jpegs) if jpegs else None,
        sizes=tuple(len(jpeg) for jpeg in jpegs),
        where=where,
        pixels=torch.utils.data.default_collate(others) if others else None,
        labels=torch.tensor([item[1] for item in items], dtype=torch.int64),
        shapes=torch.tensor([item[3] or (0, 0) for item in items], dtype=torch.int64).view(-1, 2),
        bad=[item[2] for item in items if item[2] is not None],
        indices=tuple(item[4] for item in items),
    )


def _concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` of 1-D tensors, into shared memory in a worker (as ``default_collate``
    stacks), so that the batch reaches the main process without another copy."""
    out = None
    if torch.utils.data.get_worker_info() is not None:
        numel = sum(t.numel() for t in tensors)
        storage = tensors[0]._typed_storage()._new_shared(numel, device=tensors[0].device)
        out = tensors[0].new(storage).resize_(numel)
    return torch.cat(tensors, out=out)


class _BatchSampler:
    """Feeds a DataLoader the batches of the owning ``Batches``' current epoch.

    It holds the ``Batches`` by a weak reference: in a reference cycle, the DataLoader
    would be freed by the cyclic garbage collector, at some later allocation, and its
    persistent workers, shut down from there, miss the exit signal: each waits out a 5 s
    join timeout and is terminated (10 s for 2 workers, measured with torch 2.14).
    """

    def __init__(self, batches: Batches) -> None:
        self._batches = weakref.ref(batches)

    @property
    def batches(self) -> Batches:
        batches = self._batches()
        if batches is None:
            raise RuntimeError("the Batches that owns this DataLoader is gone")
        return batches

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
    pinned memory on CUDA and non-blocking copies; an image folder with ``decode="device"``
    has its JPEG files decoded on ``device`` instead (see the module docstring). See
    ``Batches`` for the order.
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
