"""sslkit.data: dataset files in their real formats (written small here), limits, channels,
and the batch order across processes."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
import torchvision.io as tio

from sslkit.errors import UserError
from sslkit.config import DataConfig
from sslkit.data import DATASETS, ImageData, load_dataset, make_batches, match_channels
from sslkit.data import datasets as datasets_module

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.usefixtures("no_default_places")


# ---------------------------------------------------------------------------------------
# Fashion-MNIST


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def write_fashion_mnist(folder: Path, gz: bool = True, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    written = {}
    for split, prefix, n in (("train", "train", 7), ("test", "t10k", 5)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        written[split] = images, labels
    return written


def assert_same(data: ImageData, images: np.ndarray, labels: np.ndarray) -> None:
    assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
    assert torch.equal(data.images, torch.from_numpy(images).reshape(len(images), -1, *images.shape[-2:]))
    assert torch.equal(data.labels, torch.from_numpy(labels).long())


@pytest.mark.parametrize("layout, gz", [(".", True), ("FashionMNIST/raw", True), ("FashionMNIST/raw", False)])
def test_fashion_mnist_from_root(tmp_path: Path, layout: str, gz: bool) -> None:
    written = write_fashion_mnist(tmp_path / "fm" / layout, gz=gz)
    for split in ("train", "test"):
        data = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "fm")), split)
        assert data.num_classes == 10 and data.channels == 1
        assert_same(data, *written[split])


@pytest.mark.parametrize("subdir", ["fashion-mnist", ""])
def test_fashion_mnist_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, subdir: str) -> None:
    written = write_fashion_mnist(tmp_path / "env" / subdir)
    monkeypatch.setenv("SSLKIT_DATA", str(tmp_path / "env"))
    assert_same(load_dataset(DataConfig(name="fashion_mnist"), "test"), *written["test"])


def test_root_comes_before_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_root = write_fashion_mnist(tmp_path / "root", seed=1)
    write_fashion_mnist(tmp_path / "env", seed=2)
    monkeypatch.setenv("SSLKIT_DATA", str(tmp_path / "env"))
    data = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "root")), "train")
    assert_same(data, *from_root["train"])


class RecordingDownload:
    """Stands in for torchvision.datasets.FashionMNIST: writes the files where torchvision would."""

    calls: list[Path] = []

    def __init__(self, root: str, train: bool, download: bool) -> None:
        RecordingDownload.calls.append(Path(root))
        write_fashion_mnist(Path(root) / "FashionMNIST" / "raw")


def test_missing_fashion_mnist_names_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torchvision.datasets.FashionMNIST", RecordingDownload)
    RecordingDownload.calls = []
    monkeypatch.setenv("SSLKIT_DATA", str(tmp_path / "env"))
    with pytest.raises(UserError) as err:
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "root")), "train")
    message = str(err.value)
    for place in ("root", "env/fashion-mnist", "env", "system/fashion-mnist", "cache"):
        assert str(tmp_path / place) in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.download=true" in message
    assert RecordingDownload.calls == []  # no download unless data.download is true


def test_download_only_when_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr("torchvision.datasets.FashionMNIST", RecordingDownload)
    RecordingDownload.calls = []
    cfg = DataConfig(name="fashion_mnist", root=str(tmp_path / "root"), download=True)
    data = load_dataset(cfg, "train")
    assert RecordingDownload.calls == [tmp_path / "root"] and len(data) == 7
    assert "downloading" in capsys.readouterr().out
    load_dataset(cfg, "test")  # now found on disk
    assert len(RecordingDownload.calls) == 1


def test_corrupt_idx_names_file(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-10]))
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz"):
        load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)), "train")


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets_module, "SYSTEM_DATA_DIR", REAL_FASHION_MNIST.parent)
    data = load_dataset(DataConfig(name="fashion_mnist"), "train")
    assert data.images.shape == (60000, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.num_classes == 10 and torch.equal(data.labels.bincount(), torch.full((10,), 6000))


# ---------------------------------------------------------------------------------------
# CIFAR


def write_cifar(root: Path, classes: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pickled batches as in torchvision's cifar-*-python archives; (N, 3, 32, 32) per split."""
    rng = np.random.default_rng(classes)
    if classes == 10:
        folder, key = root / "cifar-10-batches-py", "labels"
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    else:
        folder, key = root / "cifar-100-python", "fine_labels"
        files = {"train": ["train"], "test": ["test"]}
    folder.mkdir(parents=True)
    written = {}
    for split, names in files.items():
        parts = []
        for i, name in enumerate(names):
            n = 3 + i  # unequal batches, so the order of concatenation shows
            images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
            labels = rng.integers(0, classes, n)
            batch = {"data": images.reshape(n, -1), key: labels.tolist(), "filenames": [f"{j}.png" for j in range(n)]}
            if classes == 100:
                batch["coarse_labels"] = (labels // 5).tolist()
            with open(folder / name, "wb") as f:
                pickle.dump(batch, f)
            parts.append((images, labels))
        written[split] = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return written


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_reads_back(tmp_path: Path, classes: int) -> None:
    written = write_cifar(tmp_path, classes)
    for split in ("train", "test"):
        data = load_dataset(DataConfig(name=f"cifar{classes}", root=str(tmp_path)), split)
        assert data.num_classes == classes and data.images.shape[1:] == (3, 32, 32)
        assert_same(data, *written[split])


def test_missing_cifar_names_places(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        load_dataset(DataConfig(name="cifar100", root=str(tmp_path / "root")), "test")
    message = str(err.value)
    assert str(tmp_path / "root" / "cifar-100-python") in message
    assert str(tmp_path / "system" / "cifar-100" / "cifar-100-python") in message
    assert "SSLKIT_DATA" in message and "data.download=true" in message


# ---------------------------------------------------------------------------------------
# Limits and channels


def test_limits_and_channels(tmp_path: Path) -> None:
    written = write_cifar(tmp_path, 10)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), train_limit=4, test_limit=2, channels=1)
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert len(train) == 4 and len(test) == 2
    rgb = torch.from_numpy(written["train"][0][:4]).float()  # (4, 3, 32, 32)
    expected = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).round()
    assert train.images.shape == (4, 1, 32, 32) and torch.equal(train.images[:, 0].float(), expected)


def test_grayscale_stays_one_channel_and_expands_for_free(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path)
    data = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), channels=3), "train")
    assert data.channels == 1
    rgb = match_channels(data.images, 3)
    assert rgb.shape == (7, 3, 28, 28) and rgb.data_ptr() == data.images.data_ptr()
    assert torch.equal(rgb[:, 2], data.images[:, 0])


# ---------------------------------------------------------------------------------------
# Image folders


def write_image_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Two classes, PNG and JPEG, square and not; returns the PNG images by file stem."""
    gen = torch.Generator().manual_seed(0)
    pngs = {}
    for cls, shapes in (("cat", [(16, 32), (20, 20)]), ("dog", [(40, 24)])):
        (folder / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(shapes):
            image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen)
            tio.write_png(image, str(folder / cls / f"{i}.png"))
            pngs[f"{cls}{i}"] = image
        tio.write_jpeg(torch.full((3, 24, 24), 200, dtype=torch.uint8), str(folder / cls / "x.JPG"))
    (folder / "dog" / "notes.txt").write_text("not an image")
    return pngs


def test_image_folder(tmp_path: Path) -> None:
    pngs = write_image_folder(tmp_path / "train")
    write_image_folder(tmp_path / "val" / "extra")  # `val` serves the test split, one level deeper
    cfg = DataConfig(name="image_folder", root=str(tmp_path), image_size=16)
    data = load_dataset(cfg, "train")
    assert data.classes == ["cat", "dog"] and data.num_classes == 2 and len(data) == 5
    items = [data[i] for i in range(len(data))]
    assert all(x.shape == (3, 16, 16) and x.dtype == torch.uint8 for x, _ in items)
    assert [y for _, y in items] == [0, 0, 0, 1, 1] == data.labels.tolist()
    # cat/0.png is 16 x 32: resized whole to the square; its own size comes with it for the crops.
    assert torch.equal(items[0][0], TF.resize(pngs["cat0"], [16, 16], antialias=True))
    assert data.load(0)[3] == (16, 32) and data.load(3)[3] == (40, 24)
    assert (items[2][0].float() - 200).abs().max() < 8  # the JPEG, lossy
    test = load_dataset(cfg, "test")
    assert test.classes == ["extra"] and len(test) == 5
    gray = load_dataset(DataConfig(name="image_folder", root=str(tmp_path), image_size=8, channels=1), "train")
    assert gray[3][0].shape == (1, 8, 8)


def test_image_folder_without_split_folders(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    cfg = DataConfig(name="image_folder", root=str(tmp_path), image_size=12, test_limit=2)
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert len(train) == 5 and len(test) == 2 and list(test.paths) == list(train.paths[:2])


def test_image_folder_errors(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train")
    with pytest.raises(UserError, match="image_size"):
        load_dataset(DataConfig(name="image_folder", root=str(tmp_path)), "train")
    with pytest.raises(UserError, match="test split"):
        load_dataset(DataConfig(name="image_folder", root=str(tmp_path), image_size=8), "test")
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    data = load_dataset(DataConfig(name="image_folder", root=str(tmp_path), image_size=8), "train")
    with pytest.raises(UserError, match="broken.png"):
        [data[i] for i in range(len(data))]
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        load_dataset(DataConfig(name="image_folder", root=str(tmp_path / "empty"), image_size=8), "train")


# ---------------------------------------------------------------------------------------
# Batches


def indexed_data(n: int) -> ImageData:
    """Image i is filled with i % 256 and labelled i, so a batch shows which samples it holds."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageData(images, torch.arange(n), num_classes=n)


def epoch_labels(batches, epoch: int) -> list[torch.Tensor]:
    batches.set_epoch(epoch)
    out = []
    for images, labels in batches:
        assert torch.equal(images[:, 0, 0, 0], (labels % 256).to(torch.uint8))  # images follow labels
        out.append(labels)
    assert len(out) == len(batches)
    return out


def test_shuffled_batches_cover_each_sample_once_and_depend_on_seed_and_epoch() -> None:
    data = indexed_data(24)
    ranks = [make_batches(data, 3, shuffle=True, drop_last=True, seed=5, rank=r, world_size=2) for r in range(2)]
    assert [len(b) for b in ranks] == [4, 4]
    epoch0 = torch.cat([torch.cat(epoch_labels(b, 0)) for b in ranks])
    assert torch.equal(epoch0.sort().values, torch.arange(24))
    again = make_batches(data, 3, shuffle=True, drop_last=True, seed=5, rank=0, world_size=2)
    assert all(torch.equal(a, b) for a, b in zip(epoch_labels(again, 0), epoch_labels(ranks[0], 0)))
    assert not torch.equal(torch.cat(epoch_labels(ranks[0], 1)), torch.cat(epoch_labels(ranks[0], 0)))
    other_seed = make_batches(data, 3, shuffle=True, drop_last=True, seed=6, rank=0, world_size=2)
    assert not torch.equal(torch.cat(epoch_labels(other_seed, 0)), torch.cat(epoch_labels(ranks[0], 0)))


@pytest.mark.parametrize("n, drop_last", [(24, True), (27, True), (27, False)])
def test_one_process_sees_the_global_batches_of_two(n: int, drop_last: bool) -> None:
    data = indexed_data(n)
    single = make_batches(data, 8, shuffle=True, drop_last=drop_last, seed=1)
    pair = [make_batches(data, 4, shuffle=True, drop_last=drop_last, seed=1, rank=r, world_size=2) for r in range(2)]
    assert len(single) == len(pair[0]) == len(pair[1]) == (n // 8 if drop_last else -(-n // 8))
    for epoch in (0, 3):
        halves = zip(epoch_labels(pair[0], epoch), epoch_labels(pair[1], epoch))
        assert all(torch.equal(s, torch.cat(h)) for s, h in zip(epoch_labels(single, epoch), halves))


def test_unshuffled_batches_shard_in_order() -> None:
    data = indexed_data(11)
    ranks = [make_batches(data, 3, shuffle=False, drop_last=False, seed=0, rank=r, world_size=2) for r in range(2)]
    per_rank = [epoch_labels(b, 0) for b in ranks]
    assert [len(b) for b in ranks] == [2, 2] and [len(x) for x in per_rank[1]] == [3, 2]
    assert torch.equal(torch.cat([torch.cat(p) for p in per_rank]), torch.arange(11))
    dropped = make_batches(data, 4, shuffle=False, drop_last=True, seed=0, rank=1, world_size=2)
    assert len(dropped) == 1 and torch.equal(epoch_labels(dropped, 0)[0], torch.arange(6, 10))


def test_batches_errors() -> None:
    with pytest.raises(UserError, match="empty"):
        make_batches(indexed_data(0), 4, shuffle=True, drop_last=False, seed=0)
    with pytest.raises(UserError, match="lower the batch size"):
        make_batches(indexed_data(10), 4, shuffle=True, drop_last=True, seed=0, rank=1, world_size=3)
    assert len(make_batches(indexed_data(10), 4, shuffle=True, drop_last=False, seed=0, world_size=3)) == 1


def test_image_folder_batches_follow_the_same_order(tmp_path: Path) -> None:
    for i in range(12):
        (tmp_path / f"c{i:02d}").mkdir()
        tio.write_png(torch.full((3, 6, 9), i, dtype=torch.uint8), str(tmp_path / f"c{i:02d}" / "a.png"))
    data = load_dataset(DataConfig(name="image_folder", root=str(tmp_path), image_size=4), "train")
    reference = make_batches(indexed_data(12), 2, shuffle=True, drop_last=False, seed=3, rank=1, world_size=2)
    for workers in (0, 2):
        batches = make_batches(
            data, 2, shuffle=True, drop_last=False, seed=3, rank=1, world_size=2, num_workers=workers
        )
        for epoch in (0, 1):
            batches.set_epoch(epoch)
            got = list(batches)
            assert all(x.shape[1:] == (3, 4, 4) and x.dtype == torch.uint8 for x, _ in got)
            assert all(torch.equal(x[:, 0, 0, 0].long(), y) for x, y in got)  # image c{i:02d} is filled with i
            assert all(torch.equal(y, r) for (_, y), r in zip(got, epoch_labels(reference, epoch)))


# ---------------------------------------------------------------------------------------
# Synthetic


def test_synthetic_is_deterministic_and_learnable() -> None:
    cfg = DataConfig(name="synthetic", image_size=16)
    train, test = load_dataset(cfg, "train"), load_dataset(cfg, "test")
    assert train.images.shape == (512, 3, 16, 16) and test.images.shape == (256, 3, 16, 16)
    assert torch.equal(train.images, DATASETS.get("synthetic")(cfg, "train").images)
    assert not torch.equal(train.images[:256], test.images)
    # Nearest class mean on raw pixels, fitted on train, scored on test: chance is 10 %.
    x_train, x_test = train.images.flatten(1).float(), test.images.flatten(1).float()
    means = torch.stack([x_train[train.labels == k].mean(0) for k in range(10)])  # (10, D)
    accuracy = (torch.cdist(x_test, means).argmin(1) == test.labels).float().mean()
    assert accuracy > 0.6
    assert len(load_dataset(DataConfig(name="synthetic", train_limit=30), "train")) == 30
