"""sslkit's SimCLR against lightly's, same backbone, batch, optimiser, epochs and seed.

lightly's side is the way its docs train SimCLR: PIL images through ``SimCLRTransform`` in
DataLoader workers, ``SimCLRProjectionHead`` and ``NTXentLoss``, a plain torch loop.
sslkit's side is ``sslkit.engine.train`` (uint8 data on the device, batched views).
Both use the same optimiser and schedule (sslkit's, from the recipe) and both are scored
by the same k-NN (sslkit's KNNMonitor, clean test images against the clean train split).

    python benchmarks/compare_lightly.py --small        # a few minutes on 2 CPU cores
    python benchmarks/compare_lightly.py recipes/simclr_fashion_mnist.yaml train.epochs=10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from PIL import Image

from sslkit.config import Config, load_config
from sslkit.data import load_dataset
from sslkit.engine import read_metrics, train
from sslkit.engine.optim import create_optimizer, create_scheduler
from sslkit.engine.trainer import knn_monitor
from sslkit.models import create_backbone

ROOT = Path(__file__).resolve().parents[1]
# Small mode: the quickstart recipe on a 20k-image subset, one epoch each.
SMALL = ["train.epochs=1", "data.train_limit=20000", "eval.bank_limit=20000", "eval.test_limit=5000"]


class PILViews(torch.utils.data.Dataset):
    """uint8 (N, C, H, W) images as RGB PIL images through a lightly transform."""

    def __init__(self, images: torch.Tensor, transform: SimCLRTransform) -> None:
        self.images = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        image = self.images[i]
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
        return self.transform(pil)


def lightly_transform(cfg: Config) -> SimCLRTransform:
    a = cfg.augment
    return SimCLRTransform(
        input_size=a.size, cj_prob=a.jitter_prob, cj_strength=1.0, cj_bright=a.brightness,
        cj_contrast=a.contrast, cj_sat=a.saturation, cj_hue=a.hue, min_scale=a.scale[0],
        random_gray_scale=a.gray_prob, gaussian_blur=a.blur_prob, sigmas=a.blur_sigma,
        hf_prob=a.hflip_prob, normalize={"mean": list(a.mean), "std": list(a.std)},
    )


class LightlySimCLR(torch.nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        m = cfg.method
        self.backbone = create_backbone(cfg.model)
        self.projection_head = SimCLRProjectionHead(
            self.backbone.num_features, m.proj_hidden_dim, m.proj_output_dim, m.proj_layers, m.proj_batch_norm
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x))


def run_lightly(cfg: Config, workers: int) -> dict[str, float]:
    set_seed(cfg.train.seed)
    data = load_dataset(cfg.data, "train")
    loader = torch.utils.data.DataLoader(
        PILViews(data.images, lightly_transform(cfg)), batch_size=cfg.train.batch_size, shuffle=True,
        drop_last=True, num_workers=workers, persistent_workers=workers > 0,
    )
    model = LightlySimCLR(cfg)
    criterion = NTXentLoss(temperature=cfg.method.temperature)
    optimizer = create_optimizer(model, cfg.optim, cfg.train.batch_size)
    total = cfg.train.epochs * len(loader)
    scheduler = create_scheduler(optimizer, cfg.optim, len(loader), total)
    images, seconds = 0, 0.0
    for _ in range(cfg.train.epochs):
        start = time.perf_counter()
        for x0, x1 in loader:
            loss = criterion(model(x0), model(x1))
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            images += len(x0)
        seconds += time.perf_counter() - start
    scores = knn_monitor(cfg, Accelerator(cpu=True))(model.backbone)
    return {**scores, "img_per_s": images / seconds, "final_loss": loss.item()}


def run_sslkit(cfg: Config) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        cfg.train.output_dir, cfg.train.name = out, "sslkit"
        scores = train(cfg)
        epochs = [m for m in read_metrics(Path(out) / "sslkit") if m.get("event") == "epoch_end"]
    images = sum(m["epoch_img_per_s"] * m["train_seconds"] for m in epochs)
    seconds = sum(m["train_seconds"] for m in epochs)
    return {"knn_top1": scores["knn_top1"], "knn_top5": scores["knn_top5"], "img_per_s": images / seconds,
            "final_loss": scores["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--small", action="store_true", help="20k images, one epoch: a few minutes on 2 cores")
    parser.add_argument("--workers", type=int, default=2, help="lightly's DataLoader workers")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    overrides = [*(SMALL if args.small else []), *args.overrides, "eval.at_start=false", "train.progress=false"]

    results = {
        "lightly": run_lightly(load_config(args.recipe, overrides), args.workers),
        "sslkit": run_sslkit(load_config(args.recipe, overrides)),
    }
    print(f"\n{'':10}{'k-NN top-1':>12}{'k-NN top-5':>12}{'train img/s':>14}{'final loss':>12}")
    for name, r in results.items():
        print(f"{name:10}{r['knn_top1']:12.4f}{r['knn_top5']:12.4f}{r['img_per_s']:14.1f}{r['final_loss']:12.4f}")
    s, l = results["sslkit"], results["lightly"]
    print(f"sslkit - lightly k-NN top-1: {100 * (s['knn_top1'] - l['knn_top1']):+.2f} points; "
          f"sslkit / lightly img/s: {s['img_per_s'] / l['img_per_s']:.2f}x")
    print(f"({torch.get_num_threads()} torch threads, {args.workers} lightly workers, "
          f"torch {torch.__version__})")
    if args.output:
        Path(args.output).write_text(json.dumps({"overrides": overrides, **results}, indent=2))


if __name__ == "__main__":
    main()
