"""Loader speed: images per second per loader worker, sslkit's pipelines against torchvision's.

On ImageNet-sized JPEGs that it writes itself (500 x 375, quality 90, photo-like: smooth
shaded regions, edges and fine texture, not noise; one class folder per 64 images), through
one DataLoader worker each, batches of 64, the epoch after a warm-up one:

  torchvision:      torchvision.datasets.ImageFolder (PIL loader) + RandomResizedCrop(S) +
                    PILToTensor: one uint8 view per image, the least a PIL pipeline does
                    (lightly's transforms start this way, then add per-image augmentation);
  lightly:          the same folder through lightly's SimCLRTransform (two augmented float views
                    per image in the worker, as lightly's examples feed it); --no-lightly skips it;
  sslkit folder:    sslkit's image_folder dataset through ``make_batches`` (decode, shorter side
                    to S, centre crop, uint8; the views are made batched on the device later);
  sslkit shards:    the same images as WebDataset tar shards (``webdataset.TarWriter``) through
                    sslkit's webdataset dataset (random access through the shard index).

Each pipeline runs ``--repeats`` times (interleaved, so that a change of machine load hits
all of them) and the best is kept; the machine's load average is printed before and after.
On a shared machine the wall-clock rates move with the other processes' load, so each
pipeline's per-image work (what its worker runs per image, without the DataLoader) is also
timed in CPU-seconds of this process: ``img_per_cpu_s_per_worker``.
Also the time to index the shards (headers only) per sample.

    python benchmarks/loader.py                    # 512 images, S = 224: about 2 minutes on 2 cores
    python benchmarks/loader.py --images 128 --repeats 1 --json /tmp/l.json   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image

from sslkit.data import make_batches
from sslkit.data.image_folder import ImageFolder
from sslkit.data.shards import ShardImages

BATCH = 64


def photo(rng: np.random.Generator, width: int = 500, height: int = 375) -> np.ndarray:
    """A photo-like uint8 (H, W, 3) image: a shaded background, overlapping shapes with soft and
    hard edges, and fine texture, so that JPEG spends its bits as on a photograph."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for c in range(3):  # low-frequency shading
        for _ in range(3):
            fx, fy, phase = rng.uniform(0.002, 0.02, 2).tolist() + [rng.uniform(0, 6.3)]
            image[..., c] += rng.uniform(20, 50) * np.sin(fx * x + fy * y + phase)
    image += rng.uniform(60, 160, 3)
    for _ in range(12):  # objects: ellipses with their own colour and shading
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(15, 120, 2)
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
        shade = 1 + 0.3 * np.sin((x - cx) / rng.uniform(5, 30))
        image[inside] = (rng.uniform(0, 255, 3) * shade[inside, None]).astype(np.float32)
    coarse = rng.normal(0, 1, (height // 4 + 1, width // 4 + 1, 1)).astype(np.float32)
    texture = np.kron(coarse, np.ones((4, 4, 1), np.float32))[:height, :width]  # grain, 4 px
    image += 12 * texture + rng.normal(0, 3, image.shape).astype(np.float32)  # and sensor noise
    return image.clip(0, 255).astype(np.uint8)


def write_images(root: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` JPEGs under ``root/<class>/`` (64 per class)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = root / f"class{i // 64:03d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(rng)).save(path, quality=90)
        paths.append(path)
    return paths


def write_shards(paths: list[Path], pattern: str, per_shard: int = 128) -> str:
    """The images (in folder order, class index as ``cls``) as webdataset shards; their URL pattern."""
    import webdataset as wds

    classes = sorted({p.parent.name for p in paths})
    count = 0
    for start in range(0, len(paths), per_shard):
        with wds.TarWriter(pattern % count) as sink:
            for path in paths[start : start + per_shard]:
                sink.write({"__key__": path.stem, "jpg": path.read_bytes(), "cls": classes.index(path.parent.name)})
        count += 1
    return pattern.replace("%06d", f"{{{0:06d}..{count - 1:06d}}}")


def rate(batches: Callable[[], Iterable], repeats: int) -> list[float]:
    """Images per second of each run through ``batches()`` (an epoch of a warm loader)."""
    out = []
    for _ in range(repeats):
        start, n = time.perf_counter(), 0
        for batch in batches():
            n += len(batch[-1])  # the labels: lightly's images are a list of views
        out.append(n / (time.perf_counter() - start))
    return out


def cpu_rate(item: Callable[[int], object], count: int, repeats: int) -> float:
    """Images per CPU-second of this process running ``item(i)`` (what a loader worker runs per
    image) over ``count`` images: the rate of one worker on a core of its own, which other
    processes' load does not change much (wall-clock rates do)."""
    best = 0.0
    for _ in range(repeats):
        start = time.process_time()
        for i in range(count):
            item(i)
        best = max(best, count / (time.process_time() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=224, help="crop side S")
    parser.add_argument("--workers", type=int, default=1, help="loader workers (the rates are divided by it)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-lightly", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()

    import torchvision
    import torchvision.transforms as T

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_images(root / "folder", args.images)
        (root / "shards").mkdir()
        urls = write_shards(paths, str(root / "shards" / "shard-%06d.tar"))
        mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024

        start = time.perf_counter()
        shards = ShardImages.open(urls, args.size)
        index_us = (time.perf_counter() - start) / len(shards) * 1e6
        folder = ImageFolder.scan(root / "folder", args.size)
        assert len(shards) == len(folder) == args.images

        def torch_loader(dataset: torch.utils.data.Dataset) -> Callable[[], Iterable]:
            loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=args.workers,
                                                 persistent_workers=True)
            return lambda: loader

        def sslkit_loader(dataset: ImageFolder) -> Callable[[], Iterable]:
            batches = make_batches(dataset, BATCH, shuffle=True, drop_last=False, seed=0, num_workers=args.workers)
            epoch = iter(range(1, 10**6))
            return lambda: (batches.set_epoch(next(epoch)), batches)[1]

        rrc = T.Compose([T.RandomResizedCrop(args.size), T.PILToTensor()])
        pipelines = {
            "torchvision": torch_loader(torchvision.datasets.ImageFolder(str(root / "folder"), transform=rrc)),
            "sslkit_folder": sslkit_loader(folder),
            "sslkit_shards": sslkit_loader(shards),
        }
        if not args.no_lightly:
            from lightly.transforms import SimCLRTransform

            lightly_transform = SimCLRTransform(input_size=args.size)
            pipelines["lightly"] = torch_loader(
                torchvision.datasets.ImageFolder(str(root / "folder"), transform=lightly_transform)
            )
        for name, batches in pipelines.items():  # warm-up epoch: workers started, files in the page cache
            rate(batches, 1)
        tv_folder = torchvision.datasets.ImageFolder(str(root / "folder"), transform=rrc)
        items = {"torchvision": tv_folder.__getitem__, "sslkit_folder": folder.load, "sslkit_shards": shards.load}
        if not args.no_lightly:
            lightly_folder = torchvision.datasets.ImageFolder(str(root / "folder"), transform=lightly_transform)
            items["lightly"] = lightly_folder.__getitem__
        per_cpu = {name: cpu_rate(item, min(args.images, 128), args.repeats) for name, item in items.items()}
        runs: dict[str, list[float]] = {name: [] for name in pipelines}
        for _ in range(args.repeats):
            for name, batches in pipelines.items():
                runs[name] += rate(batches, 1)
    per_worker = {name: max(values) / args.workers for name, values in runs.items()}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "images": args.images,
        "mean_jpeg_kb": round(mean_kb, 1),
        "size": args.size,
        "workers": args.workers,
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "img_per_s_per_worker": {name: round(v, 1) for name, v in per_worker.items()},
        "all_runs": {name: [round(v, 1) for v in values] for name, values in runs.items()},
        "img_per_cpu_s_per_worker": {name: round(v, 1) for name, v in per_cpu.items()},
        "shard_index_us_per_sample": round(index_us, 1),
        "speedup_folder": round(per_worker["sslkit_folder"] / per_worker["torchvision"], 2),
        "speedup_shards": round(per_worker["sslkit_shards"] / per_worker["torchvision"], 2),
        "speedup_folder_cpu": round(per_cpu["sslkit_folder"] / per_cpu["torchvision"], 2),
        "speedup_shards_cpu": round(per_cpu["sslkit_shards"] / per_cpu["torchvision"], 2),
    }
    for key, value in report.items():
        print(f"{key}: {value}")
    print(f"target: sslkit >= 1.5x torchvision per worker: folder {report['speedup_folder']}x, "
          f"shards {report['speedup_shards']}x (per CPU-second: {report['speedup_folder_cpu']}x, "
          f"{report['speedup_shards_cpu']}x)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
