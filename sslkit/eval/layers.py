"""Per-layer probes: a linear probe and k-NN on the features of every stage, and after the head.

Which layer holds the best representation is not always the last one: the projection head
discards information the pretext task does not need, and so, less, do the last blocks (Bordes
et al., "Guillotine Regularization: Why removing layers is needed to improve generalization in
self-supervised learning", TMLR 2023; "Investigating the Benefits of Projection Head for
Representation Learning", ICLR 2024). ``sslkit eval layers`` measures it in one embedding pass:

- the output of every stage the backbone lists in timm's ``feature_info`` (a ResNet's stem and
  stages, ``tiny_cnn``'s four blocks, a ViT's blocks: every ``every``-th one and the last),
  each global-average-pooled (a ViT's patch tokens averaged, its class and register tokens left
  out: the intermediate class token is not trained to summarise until the last block);
- ``output``: the feature network's own output, the features of ``eval knn`` and ``eval linear``;
- ``projection``: that output through the method's projection head (for DINO and iBOT the
  teacher's head, K prototype logits), when the checkpoint is a checkpoint directory of a
  method with a head (an exported backbone holds no head).

Each layer gets :func:`~sslkit.eval.linear.train_linear_probes` and weighted k-NN (the
recipe's k and temperature unless given).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from sslkit.config import Config
from sslkit.engine.checkpoint import load_feature_projection
from sslkit.errors import UserError
from sslkit.eval.clean import clean_features
from sslkit.eval.knn import knn_accuracy, knn_scores
from sslkit.eval.linear import DEFAULT_EPOCHS, DEFAULT_LRS, train_linear_probes
from sslkit.eval.protocols import register_protocol


def tapped_modules(model: nn.Module, every: int = 1) -> list[str]:
    """Names of the modules whose outputs are probed: ``feature_info``'s, ViT blocks thinned to
    every ``every``-th and the last."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise UserError(f"per-layer probes need a backbone that lists its stages (timm's feature_info); "
                        f"{type(model).__name__} does not: use a timm model or tiny_cnn")
    names = [entry["module"] for entry in info]
    if every < 1:
        raise UserError(f"--every must be at least 1, got {every}")
    if all(name.startswith("blocks.") for name in names):  # a ViT: one entry per block
        names = [n for i, n in enumerate(names) if i % every == every - 1 or i == len(names) - 1]
    return names


class LayerTaps(nn.Module):
    """Wraps a feature network: ``forward`` returns every tapped layer's pooled features, the
    network's output and (with a head) the projected output, concatenated (B, sum of dims), so
    one :func:`~sslkit.eval.clean.clean_features` pass embeds, gathers and orders them all.
    ``names`` and ``dims`` (set by the first forward) say which columns are which layer."""

    def __init__(self, model: nn.Module, modules: Sequence[str], projection: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.model = model
        self.projection = projection
        self.prefix = getattr(model, "num_prefix_tokens", 0)  # class and register tokens of a ViT
        self.tapped = [(name, model.get_submodule(name)) for name in modules]  # a plain list: not submodules again
        self.names = [*modules, "output", *(["projection"] if projection is not None else [])]
        self.dims: list[int] = []

    def pool(self, x: Tensor) -> Tensor:
        """(B, C, H, W) feature maps or (B, T, C) tokens -> (B, C)."""
        if x.ndim == 4:
            return x.mean(dim=(2, 3))
        if x.ndim == 3:
            return x[:, self.prefix:].mean(dim=1)
        return x.flatten(1)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, sum of dims)
        taps: dict[str, Tensor] = {}
        # hooks only for this call: the caller's network is left as it was
        handles = [module.register_forward_hook(lambda m, a, out, name=name: taps.__setitem__(name, out))
                   for name, module in self.tapped]
        try:
            out = self.model(x)  # (B, D)
        finally:
            for handle in handles:
                handle.remove()
        pooled = [self.pool(taps[name]) for name, _ in self.tapped] + [out.flatten(1)]
        if self.projection is not None:
            pooled.append(self.projection(out).flatten(1))
        self.dims = [p.shape[1] for p in pooled]
        return torch.cat([p.float() for p in pooled], dim=1)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--every", type=int, default=1, help="a ViT: probe every N-th block (and the last)")
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="one head per learning rate")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--k", type=int, default=None, help="k-NN neighbours (default: the recipe's eval.knn_k)")


def _plot(result: dict, out: Path) -> Path:
    from sslkit.plot import plot_layers  # matplotlib only when drawing

    return plot_layers(result, out)


@register_protocol(
    "layers", "linear probe and k-NN on every stage's features and before/after the projection head",
    summary=lambda r: "  ".join(f"{x['layer']} {x['linear_top1']:.4f}/{x['knn_top1']:.4f}" for x in r["layers"])
    + "  (linear/k-NN top-1)",
    headline=lambda r: {f"layer {x['layer']}": x["linear_top1"] for x in r["layers"]},
    arguments=_arguments, needs_checkpoint=True, plot=_plot,
)
def layers_protocol(
    cfg: Config, model: nn.Module, accelerator: Accelerator, checkpoint: Optional[str | Path] = None,
    every: int = 1, lrs: Sequence[float] = DEFAULT_LRS, epochs: int = DEFAULT_EPOCHS, k: Optional[int] = None,
) -> dict:
    """Probe every layer (module docstring); ``checkpoint``: where the projection head comes from.

    Returns:
        ``{"layers": [{"layer", "dim", "linear_top1", "linear_top5", "best_lr", "knn_top1"}, ...],
        "projection": bool}`` in depth order, the output and projection last.
    """
    k = cfg.eval.knn_k if k is None else k
    if k < 1:
        raise UserError(f"--k must be at least 1, got {k}")
    projection = load_feature_projection(checkpoint) if checkpoint is not None else None
    if projection is not None:
        projection = projection.to(accelerator.device)
    taps = LayerTaps(model, tapped_modules(model, every), projection)
    f = clean_features(cfg, taps, accelerator)  # every layer's columns side by side, one pass
    train_l, test_l, classes = f.train_labels, f.test_labels, f.num_classes
    layers = []
    for name, a, b in zip(taps.names, f.train.split(taps.dims, 1), f.test.split(taps.dims, 1)):  # (N, d), (Q, d)
        probe = train_linear_probes(a, train_l, b, test_l, classes, lrs=lrs, epochs=epochs)
        scores = knn_scores(b, a, train_l, classes, k, cfg.eval.knn_temperature)  # (Q, C)
        layers.append({"layer": name, "dim": a.shape[1], "linear_top1": probe["top1"], "linear_top5": probe["top5"],
                       "best_lr": probe["best_lr"], "knn_top1": knn_accuracy(scores, test_l)["knn_top1"]})
    return {"layers": layers, "projection": projection is not None, "k": k}
