"""Data sources against each other and against references: the same images as a folder and as a
list give the same batches; labels modes; full-image crops against torchvision's
RandomResizedCrop; DCT-scaled decoding; unlabeled folders monitored on a labelled set apart;
each bad input as one line.

``mixed_tree`` (JPEG and PNG of mixed sizes and aspects, nested, a symlinked folder, hidden and
non-image files) and ``SCAN_ORDER`` are meant to be shared: other sources (shards, HF datasets)
write the same images in ``SCAN_ORDER`` and compare their batches with the folder's.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from sslkit.augment import ops
from sslkit.config import load_config
from sslkit.data import data_config, describe, describe_line, load_dataset, make_batches
from sslkit.data.image_folder import decode_image_file
from sslkit.errors import UserError

S = 16  # data.image_size here

# (relative path, class, (height, width), format): the tree mixed_tree writes, in the folder's scan order
SCAN_ORDER = [
    ("cat/0.jpg", "cat", (20, 30), "JPEG"),
    ("cat/deep/1.JPEG", "cat", (16, 16), "JPEG"),
    ("cat/deep/er/2.png", "cat", (40, 16), "PNG"),
    ("cat/linked/3.png", "cat", (24, 36), "PNG"),  # cat/linked is a symlink to a folder outside the tree
    ("dog/0.png", "dog", (33, 21), "PNG"),
    ("dog/1.jpg", "dog", (64, 48), "JPEG"),
    ("dog/2.jpeg", "dog", (18, 50), "JPEG"),
]
SKIPPED = {"hidden": 2, "not_image": 1}  # .hidden.jpg, .cache/, notes.txt


def picture(height: int, width: int, seed: int) -> Image.Image:
    """Smooth random colours (JPEG-friendly), distinct per seed."""
    coarse = torch.rand(1, 3, 3, 3, generator=torch.Generator().manual_seed(seed))
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return Image.fromarray((image[0] * 255).round().byte().permute(1, 2, 0).numpy(), "RGB")


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("tree")
    root = base / "photos"
    outside = base / "elsewhere"
    for i, (rel, _, (h, w), fmt) in enumerate(SCAN_ORDER):
        path = (outside / Path(rel).name) if rel.startswith("cat/linked/") else root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        picture(h, w, i).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    (root / "cat" / "linked").symlink_to(outside, target_is_directory=True)
    picture(8, 8, 99).save(root / "dog" / ".hidden.jpg", "JPEG")
    (root / "dog" / ".cache").mkdir()
    picture(8, 8, 98).save(root / "dog" / ".cache" / "x.png", "PNG")
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("path", "label")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def all_batches(data, seed: int, epochs: int = 2, **kw) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    batches = make_batches(data, 3, shuffle=True, drop_last=False, seed=seed, **kw)
    out = []
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        out += [(b[0], b[1], b.sizes) for b in batches]
    return out


# ---------------------------------------------------------------------------------------
# The same images from every source


def test_folder_and_file_list_give_the_same_batches(mixed_tree: Path, tmp_path: Path) -> None:
    folder = load_dataset(data_config("image_folder", root=str(mixed_tree), image_size=S), "train")
    assert [os.path.relpath(p, mixed_tree) for p in folder.paths] == [rel for rel, *_ in SCAN_ORDER]
    # a .csv list beside the images (relative paths), and a .txt list elsewhere (absolute paths, tab, label)
    listed = write_csv(mixed_tree.parent / "list.csv", [(f"photos/{rel}", cls) for rel, cls, *_ in SCAN_ORDER])
    text = tmp_path / "list.txt"
    text.write_text("# path<TAB>label\n\n" + "".join(f"{mixed_tree / rel}\t{cls}\n" for rel, cls, *_ in SCAN_ORDER))
    want = all_batches(folder, seed=5)
    for root in (listed, text):
        data = load_dataset(data_config("file_list", root=str(root), image_size=S), "train")
        assert data.classes == ["cat", "dog"] and len(data) == len(SCAN_ORDER)
        got = all_batches(data, seed=5, num_workers=2)
        assert len(got) == len(want) == 6
        for (images, labels, sizes), (want_images, want_labels, want_sizes) in zip(got, want):
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
            assert torch.equal(sizes, want_sizes)
    # the sizes are each file's own (height, width) as decoded: dog/1.jpg, 64 x 48, at least twice
    # the 16 px square on both sides, is decoded DCT-scaled to half
    sizes = {tuple(s) for *_, batch_sizes in want for s in batch_sizes.tolist()}
    assert sizes == {size for *_, size, _ in SCAN_ORDER} - {(64, 48)} | {(32, 24)}


@pytest.mark.usefixtures("no_default_places")  # the shard index cache goes to tmp_path
def test_shards_and_an_hf_dataset_give_the_batches_of_the_folder(mixed_tree: Path, tmp_path: Path) -> None:
    """The same images in SCAN_ORDER as WebDataset shards (written by webdataset) and as a
    saved Hugging Face dataset: the same batches as the folder, bit for bit, for the same seed.
    Not only the same images per epoch: both are read by random access (a shard index,
    memory-mapped Arrow), so the order is the folder's one permutation per (seed, epoch)."""
    import datasets
    import webdataset as wds

    folder = load_dataset(data_config("image_folder", root=str(mixed_tree), image_size=S), "train")
    for shard, part in enumerate((SCAN_ORDER[:4], SCAN_ORDER[4:])):  # 4 + 3 samples
        with wds.TarWriter(str(tmp_path / f"part-{shard}.tar")) as sink:
            for i, (rel, cls, _, fmt) in enumerate(part):
                ext = "png" if fmt == "PNG" else "jpg"
                # class names as labels: sorted into indices as the folder's
                sink.write({"__key__": f"{shard}_{i}", ext: (mixed_tree / rel).read_bytes(), "cls": cls})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=folder.classes)})
    rows = {"image": [{"bytes": (mixed_tree / rel).read_bytes(), "path": None} for rel, *_ in SCAN_ORDER],
            "label": [folder.classes.index(cls) for _, cls, *_ in SCAN_ORDER]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    want = all_batches(folder, seed=5)
    for cfg in (data_config("webdataset", urls=str(tmp_path / "part-{0..1}.tar"), image_size=S),
                data_config("hf", root=str(tmp_path / "hf"), image_size=S, label_column="label")):
        data = load_dataset(cfg, "train")
        assert data.classes == ["cat", "dog"] and len(data) == len(SCAN_ORDER)
        got = all_batches(data, seed=5, num_workers=2)
        assert len(got) == len(want) == 6
        for (images, labels, sizes), (want_images, want_labels, want_sizes) in zip(got, want):
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
            assert torch.equal(sizes, want_sizes)


# ---------------------------------------------------------------------------------------
# Labels


def test_labels_auto_folders_and_none(mixed_tree: Path, tmp_path: Path) -> None:
    auto = load_dataset(data_config("image_folder", root=str(mixed_tree), image_size=S), "train")
    assert auto.info == {"labels": "folders", "skipped": SKIPPED}
    assert auto.labels.tolist() == [["cat", "dog"].index(cls) for _, cls, *_ in SCAN_ORDER]
    summary = describe(auto, data_config("image_folder", root=str(mixed_tree)))
    assert summary == {"source": "image_folder", "labels": "folders", "images": 7, "classes": 2, "skipped": SKIPPED}
    assert describe_line(summary, data_config("image_folder", root=str(mixed_tree))) == (
        f"image_folder {mixed_tree}: 7 images, 2 classes (data.labels=auto -> folders); "
        "skipped 2 hidden, 1 non-image file(s)")

    none = load_dataset(data_config("image_folder", root=str(mixed_tree), image_size=S, labels="none"), "train")
    assert list(none.paths) == list(auto.paths) and none.num_classes == 0 and set(none.labels.tolist()) == {-1}

    flat = tmp_path / "flat"  # loose images, one subfolder: auto takes no labels, every image below the root
    (flat / "more").mkdir(parents=True)
    picture(10, 12, 0).save(flat / "a.jpg")
    picture(12, 10, 1).save(flat / "more" / "b.png")
    data = load_dataset(data_config("image_folder", root=str(flat), image_size=S), "train")
    assert data.info["labels"] == "none" and len(data) == 2 and data.num_classes == 0
    with pytest.raises(UserError, match="data.labels=folders but .* holds 1 loose image"):
        load_dataset(data_config("image_folder", root=str(flat), image_size=S, labels="folders"), "train")
    skip = load_dataset(data_config("image_folder", root=str(flat), image_size=S, labels="folders",
                                    bad_images="skip"), "train")
    assert len(skip) == 1 and skip.classes == ["more"] and skip.info["skipped"] == {"loose": 1}

    # a list without a label column has no labels (auto), as does labels=none on one with it
    rows = [(str(mixed_tree / rel), cls) for rel, cls, *_ in SCAN_ORDER]
    listed = write_csv(tmp_path / "paths.csv", [(p, "") for p, _ in rows], header=("path", "caption"))
    assert load_dataset(data_config("file_list", root=str(listed), image_size=S), "train").num_classes == 0
    labelled = write_csv(tmp_path / "labelled.csv", rows)
    plain = load_dataset(data_config("file_list", root=str(labelled), image_size=S, labels="none"), "train")
    assert plain.num_classes == 0 and plain.info["labels"] == "none"


# ---------------------------------------------------------------------------------------
# Full-image crops


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    values = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), values, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), values, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


@pytest.mark.parametrize("height, width", [(375, 500), (300, 120), (64, 64)])
def test_crop_parameters_follow_torchvision_over_the_whole_image(height: int, width: int) -> None:
    """Boxes drawn for images of their own size, batched with other sizes, against
    ``RandomResizedCrop.get_params`` on an image of that size: area fraction, aspect and the
    crop centre's position over the whole image have the same distributions (two-sample KS)."""
    n = 4000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    ref = np.array([RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)], float)
    ref_y, ref_x, ref_h, ref_w = ref.T
    # every other row is an image of another size: the crops follow each row's own size
    sizes = torch.tensor([[height, width], [50, 700]]).repeat(n, 1)  # (2n, 2)
    boxes = ops.sample_crop_boxes(2 * n, sizes[:, 0], sizes[:, 1], scale, ratio,
                                  torch.Generator().manual_seed(1))[0::2].double().numpy()  # (n, 4)
    # (float64 as the reference: the same atom of a discrete distribution must compare equal)
    x, y, w, h = boxes.T
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= width).all() and (y + h <= height).all()
    bound = 1.95 * math.sqrt(2 / n)  # the KS critical value at alpha = 0.001
    for name, ours, theirs in [
        ("area", w * h / (height * width), ref_w * ref_h / (height * width)),
        ("aspect", np.log(w / h), np.log(ref_w / ref_h)),
        ("centre x", (x + w / 2) / width, (ref_x + ref_w / 2) / width),
        ("centre y", (y + h / 2) / height, (ref_y + ref_h / 2) / height),
    ]:
        assert ks_statistic(ours, theirs) < bound, name
    # the crops reach the sides of a wide photo, not only its centre square
    assert (x == 0).any() and (x + w == width).any()


def test_views_crop_the_image_not_its_square() -> None:
    """An image resized whole to the square, with its own size: a crop box drawn in the image
    (x0, y0, w, h) samples the same place as torchvision's resized_crop of the original."""
    height, width = 30, 60
    ramp = torch.arange(width, dtype=torch.float32).repeat(height, 1)[None, None] * 4  # (1, 1, H, W): 4 x column
    canvas = TF.resize(ramp, [S, S], antialias=False)  # what the loader sends (bilinear, to a square)
    box = torch.tensor([[30.0, 0.0, 30.0, 30.0]])  # the right half of the image, a square crop
    sizes = torch.tensor([[height, width]])
    ours = ops.resized_crop_flip(canvas, ops.image_boxes(box, sizes, (S, S)), torch.tensor([False]), 8)
    theirs = TF.resized_crop(ramp, 0, 30, 30, 30, [8, 8], antialias=False)
    assert (ours - theirs).abs().max() < 4 * 1.5  # within about a source column of the original
    centre = ops.resized_crop_flip(canvas, ops.centre_square_boxes(sizes, (S, S)), torch.tensor([False]), 8)
    assert (centre - TF.center_crop(TF.resize(ramp, 8, antialias=False), 8)).abs().max() < 4 * 1.5


def test_large_jpegs_decode_dct_scaled(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    picture(300, 400, 3).save(path, "JPEG", quality=95)
    reduced = decode_image_file(str(path), 3, min_side=64)
    full = decode_image_file(str(path), 3)
    assert tuple(full.shape) == (3, 300, 400) and tuple(reduced.shape) == (3, 75, 100)  # 1/4: the last scale >= 64
    assert tuple(decode_image_file(str(path), 3, min_side=200).shape) == (3, 300, 400)  # not twice as large
    same = TF.resize(full, [64, 64], antialias=True).float() - TF.resize(reduced, [64, 64], antialias=True).float()
    assert same.abs().mean() < 2


# ---------------------------------------------------------------------------------------
# Unlabeled training data, monitored on a labelled set apart


@pytest.fixture(scope="module")
def unlabeled_jpegs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unlabeled")
    for i in range(24):
        picture(12 + i % 5 * 7, 40 - i % 4 * 6, i).save(root / f"img{i:03d}.jpg", "JPEG")
    return root


def tiny_run(tmp_path: Path, root: Path, *extra: str) -> list[str]:
    return [
        "data.name=image_folder", f"data.root={root}", f"data.image_size={S}", "data.num_workers=0",
        "model.backbone=tiny_cnn", "model.width=4", f"augment.size={S}", "method.proj_hidden_dim=8",
        "method.proj_output_dim=8", "train.batch_size=8", "train.epochs=1", "train.progress=false",
        "train.log_every_steps=1", "eval.collapse_every_steps=1", f"train.output_dir={tmp_path}", *extra,
    ]


def test_unlabeled_folder_trains_and_logs_knn_on_fashion_mnist(unlabeled_jpegs: Path, tmp_path: Path, capsys) -> None:
    from sslkit.engine import read_metrics, train

    cfg = load_config(None, tiny_run(tmp_path, unlabeled_jpegs, "train.name=run", "eval.data.name=fashion_mnist",
                                     "eval.data.train_limit=200", "eval.data.test_limit=100", "eval.knn_k=5"))
    train(cfg)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        f"data: image_folder {unlabeled_jpegs}: 24 images, no labels (data.labels=auto -> none)")
    assert "eval.data: fashion_mnist: 200 images, 10 classes" in out
    assert "online probe off: the training data (image_folder) has no labels" in out
    metrics = read_metrics(tmp_path / "run")
    start = next(m for m in metrics if m.get("event") == "start")
    assert start["data_labels"] == "none" and start["data_images"] == 24 and start["data_classes"] == 0
    assert start["knn"] is True and start["online_probe"] is False and start["eval_data"] == "fashion_mnist"
    knn = [m["knn_top1"] for m in metrics if "knn_top1" in m]
    assert len(knn) == 2 and all(0 <= k <= 1 for k in knn)  # untrained and after the epoch
    assert any("eff_rank" in m for m in metrics)

    # sslkit eval without --data scores on the run's eval.data
    from sslkit.cli import main

    assert main(["eval", "knn", "--checkpoint", str(tmp_path / "run" / "backbone.safetensors"),
                 "--bank-limit", "200", "--test-limit", "100", "--k", "5", "data.num_workers=0"]) == 0
    assert "knn on fashion_mnist: top-1" in capsys.readouterr().out


def test_without_labels_knn_is_off_with_a_line_and_collapse_still_logs(
    unlabeled_jpegs: Path, tmp_path: Path, capsys
) -> None:
    from sslkit.engine import read_metrics, train

    train(load_config(None, tiny_run(tmp_path, unlabeled_jpegs, "train.name=run")))
    out = capsys.readouterr().out
    assert ("k-NN monitor off: the training data (image_folder " f"{unlabeled_jpegs}) has no labels: point eval.data "
            "at a labelled set (e.g. eval.data.name=fashion_mnist") in out
    metrics = read_metrics(tmp_path / "run")
    assert not any("knn_top1" in m for m in metrics)
    collapse = [m for m in metrics if "eff_rank" in m]
    assert len(collapse) == 3  # every step of the epoch (24 images, batch 8)


# ---------------------------------------------------------------------------------------
# Bad input: one line each, naming the file or key and the fix


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.txt").write_text("x")
    with pytest.raises(UserError) as err:
        load_dataset(data_config("image_folder", root=str(tmp_path), image_size=S), "train")
    assert str(err.value) == (
        f"no images in {tmp_path}: its 1 class folder(s) (sub) hold no files with extensions .jpg, .jpeg, .png, "
        ".webp (1 hidden or non-image file(s) skipped). Put the images in them, or point data.root at the folder "
        "that holds the images")
    with pytest.raises(UserError, match=rf"no images in {tmp_path}: no files .* at any depth \(1 hidden or non-image"):
        load_dataset(data_config("image_folder", root=str(tmp_path), image_size=S, labels="none"), "train")


def test_list_naming_missing_files(mixed_tree: Path, tmp_path: Path) -> None:
    rows = [(str(mixed_tree / rel), cls) for rel, cls, *_ in SCAN_ORDER[:3]] + [("gone/x.jpg", "cat")]
    listed = write_csv(tmp_path / "list.csv", rows)
    with pytest.raises(UserError) as err:
        load_dataset(data_config("file_list", root=str(listed), image_size=S), "train")
    assert str(err.value) == (
        f"{listed} names 1 file(s) that do not exist, e.g. {tmp_path / 'gone/x.jpg'} (relative paths are relative "
        f"to {tmp_path}): fix the list, or set data.bad_images=skip to leave them out")
    cfg = data_config("file_list", root=str(listed), image_size=S, bad_images="skip")
    data = load_dataset(cfg, "train")
    assert len(data) == 3 and data.info["skipped"] == {"missing": 1}
    assert describe_line(describe(data, cfg), cfg).endswith("3 images, 1 classes (data.labels=auto -> column); "
                                                            "skipped 1 missing file(s)")


def test_list_missing_column(tmp_path: Path) -> None:
    listed = write_csv(tmp_path / "list.csv", [("a.jpg", "x")], header=("file", "label"))
    with pytest.raises(UserError) as err:
        load_dataset(data_config("file_list", root=str(listed), image_size=S), "train")
    assert str(err.value) == (f"{listed} has no column 'path' (its columns: file, label): set data.path_column to "
                              "the header of the column of file paths")
    with pytest.raises(UserError, match=r"has no column 'class' \(its columns: file, label\) and data.labels=column"):
        load_dataset(data_config("file_list", root=str(listed), image_size=S, path_column="file", labels="column",
                                 label_column="class"), "train")
    text = tmp_path / "list.txt"
    text.write_text("a.jpg\tcat\nb.jpg\n")
    with pytest.raises(UserError, match=r"list.txt: line 2 has no label .* label every line, or set data.labels=none"):
        load_dataset(data_config("file_list", root=str(text), image_size=S), "train")


def test_folders_with_loose_images(mixed_tree: Path, tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    picture(10, 10, 0).save(tmp_path / "cat" / "a.jpg")
    picture(10, 10, 1).save(tmp_path / "stray.jpg")
    with pytest.raises(UserError) as err:
        load_dataset(data_config("image_folder", root=str(tmp_path), image_size=S, labels="folders"), "train")
    assert str(err.value) == (
        f"data.labels=folders but {tmp_path} holds 1 loose image(s) beside its class folders, e.g. "
        f"{tmp_path / 'stray.jpg'}: move them into one subfolder per class, set data.labels=none to train on every "
        "image without labels, or set data.bad_images=skip to leave them out")
    data = load_dataset(data_config("image_folder", root=str(tmp_path), image_size=S, labels="folders",
                                    bad_images="skip"), "train")
    assert len(data) == 1 and data.info["skipped"] == {"loose": 1}


def test_sharded_views_of_sized_images_equal_the_global_batch() -> None:
    """Each process draws the crops of the whole global batch and keeps its rows: with images of
    their own sizes too, two processes' views are one process's, split."""
    from sslkit.augment import augment_config, create_augment

    views = create_augment(augment_config("simclr", size=8))
    images = torch.randint(0, 256, (6, 3, S, S), dtype=torch.uint8)
    sizes = torch.tensor([[20, 30], [40, 16], [16, 16], [24, 36], [33, 21], [18, 50]])
    whole = views(images, torch.Generator().manual_seed(0), (0, 1), sizes)
    parts = [views(images[r * 3:(r + 1) * 3], torch.Generator().manual_seed(0), (r, 2), sizes[r * 3:(r + 1) * 3])
             for r in range(2)]
    for v, view in enumerate(whole):
        assert torch.allclose(view, torch.cat([part[v] for part in parts]), atol=1e-5)
    unsized = views(images, torch.Generator().manual_seed(0), (0, 1))
    assert not torch.allclose(whole[0], unsized[0])  # the sizes change the crops
