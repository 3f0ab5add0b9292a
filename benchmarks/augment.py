"""Augmentation alone: sslkit's batched SimCLR views vs lightly's per-image PIL transform.

Both make two views of the same uint8 images in one process; medians of ``--repeats``.
Usage: ``python benchmarks/augment.py [--batch 512] [--size 32] [--repeats 7]``.
"""

from __future__ import annotations

import argparse

import torch
from lightly.transforms import SimCLRTransform
from PIL import Image

from sslkit.augment import create_augment
from sslkit.config import AugmentConfig
from throughput import median_img_per_s  # this script's folder is on sys.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)
    views = create_augment(AugmentConfig(size=args.size))  # SimCLR, blur off (lightly's CIFAR setting)
    generator = torch.Generator().manual_seed(0)
    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images]
    transform = SimCLRTransform(input_size=args.size, cj_strength=0.5, gaussian_blur=0.0)

    cpu = torch.device("cpu")
    ours = median_img_per_s(lambda: views(images, generator), args.batch, args.repeats, cpu)
    theirs = median_img_per_s(lambda: [transform(p) for p in pil], args.batch, args.repeats, cpu)
    print(f"batch {args.batch} of {args.size} px, two views, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"sslkit batched views   {ours:10.0f} img/s")
    print(f"lightly PIL per image  {theirs:10.0f} img/s")
    print(f"ratio                  {ours / theirs:10.2f}x")


if __name__ == "__main__":
    main()
