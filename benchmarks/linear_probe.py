"""Linear probe on cached Fashion-MNIST features: extraction once, then all heads in one pass.

Usage: ``python benchmarks/linear_probe.py [--checkpoint runs/quickstart/backbone.safetensors]``
(without a checkpoint: the quickstart recipe's untrained backbone). Prints the seconds spent
embedding and probing, and each learning rate's top-1.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sslkit.config import load_config
from sslkit.engine.checkpoint import load_feature_model
from sslkit.engine.trainer import create_accelerator
from sslkit.eval.clean import clean_features
from sslkit.eval.linear import DEFAULT_EPOCHS, train_linear_probes
from sslkit.models import create_backbone

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    args = parser.parse_args()
    if args.checkpoint:
        cfg, model = load_feature_model(args.checkpoint)
    else:
        cfg = load_config(ROOT / "recipes" / "quickstart.yaml")
        model = create_backbone(cfg.model)
    accelerator = create_accelerator(cfg.train)

    start = time.perf_counter()
    train_f, train_l, test_f, test_l, classes = clean_features(cfg, model.to(accelerator.device), accelerator)
    embed = time.perf_counter() - start
    start = time.perf_counter()
    result = train_linear_probes(train_f, train_l, test_f, test_l, classes, epochs=args.epochs)
    probe = time.perf_counter() - start

    print(f"features: train {tuple(train_f.shape)}, test {tuple(test_f.shape)}; {torch.get_num_threads()} threads")
    print(f"embedding both splits: {embed:.1f} s")
    print(f"probing {len(result['per_lr'])} learning rates x {args.epochs} epochs in one pass: {probe:.1f} s")
    for lr, r in result["per_lr"].items():
        print(f"  lr {lr:<6g} top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f}")
    print(f"best: lr {result['best_lr']:g}, top-1 {result['top1']:.4f}")


if __name__ == "__main__":
    main()
