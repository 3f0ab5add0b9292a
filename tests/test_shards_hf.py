"""WebDataset shards and local Hugging Face datasets: read as webdataset and datasets read them,
the same images as a folder give the same batches, every sample once per epoch over two
processes, bad shards and missing columns named in one line."""

from __future__ import annotations

import functools
import io
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslkit.data import make_batches
from sslkit.data.image_folder import BadImageError, BadImageWarning, ImageFolder
from sslkit.data.shards import ShardImages
from sslkit.errors import UserError
from tests.conftest import run_gloo_workers

SIZE = 16
N = 24  # 3 classes x 8
pytestmark = pytest.mark.usefixtures("no_default_places")  # the shard index cache too goes to tmp_path


def image_bytes(rng: np.random.Generator, fmt: str) -> bytes:
    """A unique image of a random size and aspect, as a JPEG or PNG file's bytes."""
    height, width = rng.integers(12, 40, 2)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def write_shards(folder: ImageFolder, pattern: str, per_shard: int) -> str:
    """``folder``'s images, in its order, as webdataset shards written by webdataset itself."""
    import webdataset as wds

    count = 0
    for start in range(0, len(folder), per_shard):
        with wds.TarWriter(pattern % count) as sink:
            for i in range(start, min(start + per_shard, len(folder))):
                path = Path(str(folder.paths[i]))
                ext = "png" if path.suffix == ".png" else "jpg"
                sink.write({"__key__": f"{path.parent.name}_{path.stem}", ext: path.read_bytes(),
                            "cls": int(folder.labels[i]), "json": {"source": path.name}})
        count += 1
    return pattern.replace("%02d", f"{{00..{count - 1:02d}}}")


def write_table(folder: ImageFolder, root: Path) -> None:
    """``folder``'s images and labels as a Hugging Face dataset saved with ``save_to_disk``."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=folder.classes)})
    rows = {"image": [{"bytes": Path(str(p)).read_bytes(), "path": None} for p in folder.paths],
            "label": folder.labels.tolist()}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(root))


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same 24 images (JPEGs and a PNG, mixed sizes) as a folder, shards and an hf dataset."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    for i in range(N):
        fmt = "PNG" if i == 5 else "JPEG"
        path = root / "folder" / f"c{i % 3}" / f"img{i:02d}.{fmt.lower().replace('jpeg', 'jpg')}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(rng, fmt))
    folder = ImageFolder.scan(root / "folder", SIZE)
    (root / "shards").mkdir()
    urls = write_shards(folder, str(root / "shards" / "part-%02d.tar"), per_shard=10)  # 10, 10, 4
    write_table(folder, root / "table")
    return {"root": root, "folder": folder, "urls": urls}


def epoch_batches(data, epoch: int, start: int = 0, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = make_batches(data, 4, shuffle=True, drop_last=True, seed=7, **kwargs)
    batches.set_epoch(epoch, start)
    return list(batches)


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (images_a, labels_a), (images_b, labels_b), batch_a, batch_b in zip(a, b, a, b):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
        assert torch.equal(batch_a.sizes, batch_b.sizes)  # each image's own size, for the crops


# ---------------------------------------------------------------------------------------
# WebDataset shards


def test_shards_hold_the_samples_webdataset_reads(sources: dict, tmp_path: Path) -> None:
    """Keys, grouping and image bytes as ``webdataset.WebDataset`` reads them, with pax long
    names, a sample without an image, metadata members and upper-case extensions."""
    import webdataset as wds

    rng = np.random.default_rng(1)
    with wds.TarWriter(str(tmp_path / "odd.tar")) as sink:
        sink.write({"__key__": "a" * 150, "jpg": image_bytes(rng, "JPEG"), "cls": 2})  # > 100 chars: a pax path
        sink.write({"__key__": "sub/dir/b", "PNG": image_bytes(rng, "PNG"), "cls": 0})
        sink.write({"__key__": "no_image", "cls": 1, "txt": "hello"})
        sink.write({"__key__": "c", "webp": b"not really webp", "jpg": image_bytes(rng, "JPEG")})
    urls = f"{sources['urls']}::{tmp_path / 'odd.tar'}"
    data = ShardImages.open(urls, SIZE, bad_images="skip")
    reference = list(wds.WebDataset(urls, shardshuffle=False))
    assert [str(p).rsplit(":", 1)[1] for p in data.paths] == [s["__key__"] for s in reference]
    for i, sample in enumerate(reference):
        image = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
        if image is None:
            assert data.offsets[i] == -1
        else:
            assert bytes(data._raw(i)) == image
    assert data.labels[-4:].tolist() == [2, 0, 1, -1]
    assert data.classes == ["0", "1", "2"]
    assert torch.equal(data.labels[:N], sources["folder"].labels)


def test_shards_give_the_folder_s_batches_and_a_resumed_epoch_is_the_uninterrupted_tail(sources: dict) -> None:
    """Bit-identical batches for the same seed, every epoch (tests/test_data_sources.py compares
    every source on one tree); a resumed epoch is the tail of the uninterrupted one."""
    shards = ShardImages.open(sources["urls"], SIZE)
    assert len(shards) == N
    for epoch in (0, 1):
        folder_batches = epoch_batches(sources["folder"], epoch)
        assert_same_batches(epoch_batches(shards, epoch, num_workers=1), folder_batches)
    assert_same_batches(epoch_batches(shards, 1, start=2, num_workers=1), folder_batches[2:])
    assert not torch.equal(torch.cat([b[1] for b in epoch_batches(shards, 0)]),
                           torch.cat([b[1] for b in epoch_batches(shards, 1)]))  # the order changes per epoch


def _seen(urls: str, rank: int) -> dict:
    """What rank ``rank`` of 2 gets from the shards over two epochs: its images' fingerprints."""
    data = ShardImages.open(urls, SIZE)
    batches = make_batches(data, 3, shuffle=True, drop_last=True, seed=5, rank=rank, world_size=2, num_workers=1)
    out = {}
    for epoch in (0, 1):
        batches.set_epoch(epoch)
        out[epoch] = [images.flatten(1).sum(1) * 1000 + labels for images, labels in batches]
    return out


def test_two_processes_see_every_shard_sample_once_per_epoch(sources: dict, tmp_path: Path) -> None:
    """Two gloo processes (world size asserted), a loader worker each: every sample once per
    epoch, the same number of steps on both."""
    ranks = run_gloo_workers(functools.partial(_seen, sources["urls"]), tmp_path)
    data = ShardImages.open(sources["urls"], SIZE)
    expected = sorted((torch.stack([data[i][0] for i in range(N)]).flatten(1).sum(1) * 1000 + data.labels).tolist())
    for epoch in (0, 1):
        assert len(ranks[0][epoch]) == len(ranks[1][epoch]) == N // 6
        seen = torch.cat([torch.cat(r[epoch]) for r in ranks]).tolist()
        assert sorted(seen) == expected
        assert len(set(expected)) == N  # the fingerprints tell the images apart


def cut(src: Path, dst: Path, size: int) -> Path:
    dst.write_bytes(src.read_bytes()[:size])
    return dst


def tar_layout(path: Path) -> list[tuple[str, int, int]]:
    """``(member, header offset, end of its data)`` as Python's tarfile reads them."""
    import tarfile

    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data + m.size) for m in tar]


@pytest.mark.parametrize("damage", ["not_a_tar", "empty", "cut_in_image", "cut_between_samples"])
def test_a_bad_shard_is_named_and_skipped_on_request(sources: dict, tmp_path: Path, damage: str) -> None:
    first = Path(sources["urls"].split("{")[0] + "00.tar")
    members = tar_layout(first)
    jpg_end = [end for name, _, end in members if name.endswith((".jpg", ".png"))]
    if damage == "not_a_tar":
        bad, kept = tmp_path / "bad.tar", 0
        bad.write_bytes(b"<html>404 Not Found</html>\n" * 40)
    elif damage == "empty":
        bad, kept = tmp_path / "bad.tar", 0
        bad.write_bytes(b"")
    elif damage == "cut_in_image":  # inside the 4th sample's image: 3 complete samples
        bad, kept = cut(first, tmp_path / "bad.tar", jpg_end[3] - 10), 3
    else:  # after the 4th sample's last member (its json), no end-of-archive blocks: the 4th may be
        # incomplete (a shard cut at a member boundary does not say), so it is dropped too
        json_end = [end for name, _, end in members if name.endswith(".json")][3]
        bad, kept = cut(first, tmp_path / "bad.tar", -(-json_end // 512) * 512), 3
    urls = f"{bad}::{sources['urls']}"
    with pytest.raises(BadImageError) as err:
        ShardImages.open(urls, SIZE)
    message = str(err.value)
    assert "\n" not in message and str(bad) in message and "data.bad_images=skip" in message
    whole = damage in ("not_a_tar", "empty")
    assert ("not a tar" in message or "is empty" in message) if whole else "cut short" in message
    with pytest.warns(BadImageWarning, match=str(bad)):
        data = ShardImages.open(urls, SIZE, bad_images="skip")
    assert len(data) == N + kept and len(data.skipped) == 1
    from sslkit.data import data_config, describe, describe_line

    cfg = data_config("webdataset", urls=urls, image_size=SIZE, bad_images="skip")
    assert describe_line(describe(data, cfg), cfg).endswith("; skipped 1 damaged shard file(s)")  # the run's first line
    reference = ShardImages.open(sources["urls"], SIZE)
    for i in range(kept):  # the complete samples are there and decode
        assert torch.equal(data[i][0], reference[i][0])


def test_a_sample_that_does_not_decode_follows_bad_images(sources: dict, tmp_path: Path) -> None:
    import webdataset as wds

    rng = np.random.default_rng(2)
    good = [image_bytes(rng, "JPEG") for _ in range(3)]
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "k0", "jpg": good[0], "cls": 0})
        sink.write({"__key__": "k1", "jpg": good[1][: len(good[1]) // 2], "cls": 1})  # cut short
        sink.write({"__key__": "k2", "cls": 2})  # no image entry
        sink.write({"__key__": "k3", "jpg": good[2], "cls": 3})
    with pytest.raises(BadImageError, match=r"s\.tar:k1") as err:
        ShardImages.open(str(tmp_path / "s.tar"), SIZE)[1]
    assert "\n" not in str(err.value)
    with pytest.raises(BadImageError, match=r"s\.tar:k2: the sample has no image entry"):
        ShardImages.open(str(tmp_path / "s.tar"), SIZE)[2]
    data = ShardImages.open(str(tmp_path / "s.tar"), SIZE, bad_images="skip")
    batches = make_batches(data, 4, shuffle=False, drop_last=False, seed=0)
    with pytest.warns(BadImageWarning):
        [(images, labels)] = list(batches)
    assert labels.tolist() == [0, 3, 3, 3] and batches.bad_images == 2  # the next decodable sample, k3


def test_the_shard_index_is_cached_and_follows_a_changed_shard(
    sources: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import webdataset as wds

    from sslkit.data import shards as shards_module

    scans = []
    scan = shards_module.index_shard
    monkeypatch.setattr(shards_module, "index_shard", lambda *args: scans.append(args[0]) or scan(*args))
    first = ShardImages.open(sources["urls"], SIZE)
    again = ShardImages.open(sources["urls"], SIZE)
    assert len(scans) == 3  # each shard scanned once: the second open reads the cache
    assert list(first.paths) == list(again.paths) and (first.offsets == again.offsets).all()
    assert torch.equal(first.labels, again.labels)
    copy = tmp_path / "copy.tar"
    shutil.copy(Path(str(first.shards[2])), copy)
    assert len(ShardImages.open(str(copy), SIZE)) == 4
    with wds.TarWriter(str(copy)) as sink:  # rewritten: another size and time
        sink.write({"__key__": "only", "jpg": Path(str(sources["folder"].paths[0])).read_bytes(), "cls": 0})
    assert list(ShardImages.open(str(copy), SIZE).paths) == [f"{copy}:only"]


def test_shard_urls_errors(sources: dict, tmp_path: Path) -> None:
    pattern = sources["urls"].replace("{00..02}", "{00..05}")
    with pytest.raises(UserError, match=r"part-03\.tar does not exist \(3 of the 6 files"):
        ShardImages.open(pattern, SIZE)
    with pytest.raises(UserError, match="not a local file"):
        ShardImages.open("https://example.com/shards-{0..3}.tar", SIZE)
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "t.tar")) as sink:
        sink.write({"__key__": "a", "jpeg": b"x", "cls": 0})
    with pytest.raises(UserError, match="none with an image entry .* data.image_key"):
        ShardImages.open(str(tmp_path / "t.tar"), SIZE, image_key="jpg;png")
    assert len(ShardImages.open(str(tmp_path / "t.tar"), SIZE, image_key="jpeg")) == 1


# ---------------------------------------------------------------------------------------
# Hugging Face datasets


def test_hf_parquet_splits_and_a_dataset_dict(sources: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from sslkit.data.hf import TableImages

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = datasets.load_from_disk(str(sources["root"] / "table"))
    (tmp_path / "pq" / "data").mkdir(parents=True)
    rows.select(range(16)).to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    rows.select(range(16, N)).to_parquet(str(tmp_path / "pq" / "data" / "test-00000-of-00001.parquet"))
    datasets.DatasetDict(train=rows.select(range(16)), validation=rows.select(range(16, N))).save_to_disk(
        str(tmp_path / "dict"))
    folder = sources["folder"]
    for root in (tmp_path / "pq", tmp_path / "dict"):
        train = TableImages.open(str(root), "train", SIZE, label_column="label")
        test = TableImages.open(str(root), "test", SIZE, label_column="label")
        assert len(train) == 16 and len(test) == N - 16
        assert torch.equal(test.labels, folder.labels[16:])
        assert torch.equal(test[0][0], folder[16][0]) and torch.equal(train[3][0], folder[3][0])
    one_file = str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet")  # one file: both splits
    assert len(TableImages.open(one_file, "test", SIZE)) == 16


def test_hf_errors(sources: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sslkit.data.hf import TableImages

    table = str(sources["root"] / "table")
    with pytest.raises(UserError, match=r"data.image_column='img' is not a column of .*image, label.*=image"):
        TableImages.open(table, "train", SIZE, image_column="img")
    with pytest.raises(UserError, match=r"data.label_column='labels' is not a column"):
        TableImages.open(table, "train", SIZE, label_column="labels")
    with pytest.raises(UserError, match="does not exist.*data.download=true"):
        TableImages.open("user/some-hub-dataset", "train", SIZE)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(UserError, match="neither a folder written by save_to_disk"):
        TableImages.open(str(tmp_path), "train", SIZE)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(UserError, match=r"pip install 'sslkit\[hf\]'"):
        TableImages.open(table, "train", SIZE)


def test_hf_a_row_that_does_not_decode_follows_bad_images(sources: dict, tmp_path: Path) -> None:
    import datasets

    from sslkit.data.hf import TableImages

    rows = datasets.load_from_disk(str(sources["root"] / "table")).select(range(4))
    cells = rows.cast_column("image", datasets.Image(decode=False))["image"]
    images = [cell["bytes"] for cell in cells]
    images[1] = images[1][:40]
    features = datasets.Features({"image": datasets.Image(), "label": rows.features["label"]})
    datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images],
                                "label": rows["label"][:]}, features=features).save_to_disk(str(tmp_path / "t"))
    with pytest.raises(BadImageError, match=r"t\[train\]\[1\]"):
        TableImages.open(str(tmp_path / "t"), "train", SIZE)[1]
    data = TableImages.open(str(tmp_path / "t"), "train", SIZE, label_column="label", bad_images="skip")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        image, label, bad, _ = data.load(1)
    assert bad is not None and torch.equal(image, data[2][0]) and label == int(data.labels[2])


# ---------------------------------------------------------------------------------------
# Training on shards


def shard_args(sources: dict) -> list[str]:
    return ["data.name=webdataset", f"data.urls={sources['urls']}", "data.image_size=16", "data.num_workers=1",
            "train.batch_size=8", "train.epochs=2", "eval.knn=false"]


def test_a_crash_mid_epoch_on_shards_resumes_to_the_uninterrupted_weights(
    sources: dict, tiny_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 steps per epoch, checkpoints every 2 steps; the run dies in its 5th step (after the
    checkpoint at step 4, mid-epoch 1) and is resumed: the same final weights, bit for bit."""
    from safetensors.torch import load_file

    from sslkit.config import load_config
    from sslkit.engine import train
    from sslkit.methods.simclr import SimCLR

    def config(name: str, *extra: str):
        return load_config(tiny_recipe, [f"train.output_dir={tmp_path}", f"train.name={name}",
                                         "train.checkpoint_every_steps=2", *shard_args(sources), *extra])

    train(config("reference"))
    ssl_step, calls = SimCLR.ssl_step, iter(range(100))

    def crashing(self, views):
        if next(calls) == 4:
            raise KeyboardInterrupt("killed")
        return ssl_step(self, views)

    monkeypatch.setattr(SimCLR, "ssl_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(config("crashed"))
    assert (tmp_path / "crashed" / "checkpoints" / "last").resolve().name == "epoch_0001_step_00000004"
    monkeypatch.setattr(SimCLR, "ssl_step", ssl_step)
    train(config("crashed", "resume=true"))
    final = [load_file(tmp_path / name / "checkpoints" / "last" / "model.safetensors")
             for name in ("reference", "crashed")]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def _two_process_shard_run(recipe: str, overrides: list, rank: int) -> None:
    from sslkit.config import load_config
    from tests.conftest import train_as_launched

    train_as_launched(load_config(recipe, overrides))


@pytest.mark.slow
def test_shards_train_in_one_and_two_processes(sources: dict, tiny_recipe: Path, tmp_path: Path) -> None:
    """Training on shards, one process with batch 8 and two with 4 each (world size asserted;
    the two in forked gloo workers, as tests/test_distributed.py does): the same steps up to
    float rounding."""
    from functools import partial

    from accelerate.utils import set_seed

    from sslkit.config import load_config
    from sslkit.engine import train
    from sslkit.methods import create_method
    from tests.conftest import run_gloo_workers
    from tests.test_distributed import METHOD_ARGS, _max_diff, _overrides, _ssl, _weights

    args = (*METHOD_ARGS["simclr"], *shard_args(sources), "train.max_steps=3", "train.epochs=1", "optim.lr=0.5")
    train(load_config(tiny_recipe, _overrides(tmp_path, "p1", args)))
    run_gloo_workers(partial(_two_process_shard_run, str(tiny_recipe), _overrides(tmp_path, "p2", args)), tmp_path)
    one, two = _weights(tmp_path / "p1", 1), _weights(tmp_path / "p2", 2)
    set_seed(0)
    init = create_method(load_config(tiny_recipe, _overrides(tmp_path, "init", args)),
                         one["online_probe.weight"].shape[0]).state_dict()
    moved = _max_diff(_ssl(one), _ssl(init))
    assert moved > 1e-3 and one.keys() == two.keys()
    assert _max_diff(one, two) < 1e-3 * moved


def test_sources_build_from_their_own_config_keys(sources: dict, tmp_path: Path) -> None:
    from sslkit.config import ConfigError, load_config
    from sslkit.data import data_config, describe, describe_line, load_dataset

    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {name: webdataset}\n")
    cfg = load_config(recipe, [f"data.urls={sources['urls']}", "data.image_size=16", "data.label_key=null"])
    shards = load_dataset(cfg.data, "train")
    assert len(shards) == N and shards.num_classes == 0 and (shards.labels == -1).all()
    assert describe_line(describe(shards, cfg.data), cfg.data) == f"webdataset: {N} images, no labels"
    with pytest.raises(ConfigError, match="image_column"):  # another source's key
        load_config(recipe, ["data.image_column=image"])
    with pytest.raises(UserError, match="needs data.urls="):
        load_dataset(data_config("webdataset", image_size=16), "train")
    test = load_dataset(data_config("webdataset", urls=sources["urls"], test_urls=sources["urls"].replace(
        "{00..02}", "02"), image_size=16), "test")
    assert len(test) == 4
    table = load_dataset(data_config("hf", root=str(sources["root"] / "table"), image_size=16, label_column="label",
                                     test_limit=5), "test")
    assert len(table) == 5 and table.num_classes == 3
    unlabeled = load_dataset(data_config("hf", root=str(sources["root"] / "table"), image_size=16), "train")
    assert unlabeled.num_classes == 0 and (unlabeled.labels == -1).all()  # no label column named
    with pytest.raises(UserError, match="needs data.image_size="):
        load_dataset(data_config("hf", root=str(sources["root"] / "table")), "train")
