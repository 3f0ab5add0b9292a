"""Figures of a run directory: training curves from ``metrics.jsonl`` and a 2-D PCA map of
the exported backbone's test-split features, written to ``run_dir/plots/``.

Figures are drawn on an explicit Agg canvas without pyplot, so no display is needed and the
backend of an interactive session that imports this module is left alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from sslkit.errors import UserError
from sslkit.data import load_dataset
from sslkit.engine.checkpoint import load_feature_model
from sslkit.engine.run_dir import read_metrics
from sslkit.eval.clean import clean_batches, clean_transform, eval_data
from sslkit.eval.features import extract_features

Series = tuple[list[int], list[float]]  # (steps, values), sorted by step

# Panel title -> which metric keys it shows, in drawing order.
PANELS: dict[str, Callable[[str], bool]] = {
    "loss": lambda key: key == "loss",
    "learning rate": lambda key: key == "lr",
    "k-NN accuracy (test)": lambda key: key.startswith("knn_"),
    "online top-1": lambda key: key == "online_top1",
}


def metric_panels(events: list[dict[str, Any]]) -> dict[str, dict[str, Series]]:
    """Group the numeric metrics of ``events`` into panels; panels without data are left out.

    A resumed run re-logs the steps after its last checkpoint, so the latest value for a
    step wins.
    """
    by_key: dict[str, dict[int, float]] = {}  # metric -> step -> value
    for event in events:
        for key, value in event.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                by_key.setdefault(key, {})[int(event["step"])] = float(value)
    panels: dict[str, dict[str, Series]] = {}
    for title, shows in PANELS.items():
        series = {
            key: (sorted(points), [points[s] for s in sorted(points)])
            for key, points in sorted(by_key.items())
            if shows(key)
        }
        if series:
            panels[title] = series
    return panels


def plot_curves(run_dir: Path, out: Path | None = None) -> Path:
    """Loss, learning rate, k-NN and online accuracy against step -> ``plots/curves.png``."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(
            f"{metrics} not found: {run_dir} is not a run directory (one is made by `sslkit train`)"
        )
    events = read_metrics(run_dir)
    panels = metric_panels(events)
    if not panels:
        raise UserError(f"{metrics} holds no loss, lr, k-NN or online metrics to plot")
    epoch_ends = sorted({e["step"] for e in events if e.get("event") == "epoch_end"})

    fig = Figure(figsize=(8, 2.4 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, series) in zip(axes, panels.items()):
        for key, (steps, values) in series.items():
            # Evaluations are a handful of points: markers keep single ones visible.
            ax.plot(steps, values, label=key, marker="o" if len(steps) <= 50 else None, markersize=3)
        for step in epoch_ends:
            ax.axvline(step, color="0.85", linewidth=0.8, zorder=0)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize="small")
    axes[0].set_title(f"{run_dir.name}" + ("  (grey lines: epoch ends)" if epoch_ends else ""))
    axes[-1].set_xlabel("step")
    return _save(fig, out or run_dir / "plots" / "curves.png")


def project_2d(features: Tensor) -> Tensor:
    """(N, D) -> (N, 2): coordinates on the first two principal axes of the centred features."""
    if min(features.shape) < 2:
        raise ValueError(f"PCA to 2-D needs at least 2 samples of at least 2 dimensions, got {tuple(features.shape)}")
    centred = features - features.mean(0)  # (N, D)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # vh: (min(N, D), D), by singular value
    return centred @ vh[:2].T  # (N, 2)


def plot_embedding(run_dir: Path, out: Path | None = None, limit: int = 2000) -> Path:
    """PCA of the exported backbone's L2-normalised features of the first ``limit`` test
    images of the run's dataset, coloured by class -> ``plots/embedding.png``."""
    run_dir = Path(run_dir)
    path = run_dir / "backbone.safetensors"
    if not path.is_file():
        raise UserError(
            f"{path} not found: `sslkit train` exports the backbone when a run finishes "
            "(an unfinished run has only checkpoints/)"
        )
    cfg, model = load_feature_model(path)
    data = load_dataset(eval_data(cfg), "test").head(limit)
    features, labels = extract_features(model, clean_batches(cfg, None, data), clean_transform(cfg))
    features, labels = F.normalize(features, dim=1).cpu(), labels.cpu()  # (N, D): the cosine geometry k-NN sees
    xy = project_2d(features)  # (N, 2)
    explained = xy.var(0) / features.var(0).sum()  # (2,) fraction of variance per axis

    num_classes = data.num_classes
    names = getattr(data, "classes", None) or [str(c) for c in range(num_classes)]  # ImageFolder has names
    cmap = colormaps["tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo"].resampled(num_classes)
    fig = Figure(figsize=(8, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for c, name in enumerate(names):
        mask = labels == c
        if mask.any():
            ax.scatter(xy[mask, 0], xy[mask, 1], s=6, alpha=0.7, color=cmap(c), label=name, linewidths=0)
    ax.set_xlabel(f"PC 1 ({explained[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({explained[1]:.0%} of variance)")
    ax.set_title(f"{run_dir.name}: {cfg.model.backbone} features, {len(labels)} {eval_data(cfg).name} test images")
    ax.legend(title="class", loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=2.5,
              fontsize="small", ncols=math.ceil(len(names) / 25))
    return _save(fig, out or run_dir / "plots" / "embedding.png")


def plot_run(run_dir: str | Path, limit: int = 2000) -> list[Path]:
    """Both figures; without an exported backbone only the curves, saying why."""
    run_dir = Path(run_dir)
    paths = [plot_curves(run_dir)]
    try:
        paths.append(plot_embedding(run_dir, limit=limit))
    except UserError as err:  # no backbone yet, or the run's dataset is not on this machine
        print(f"embedding skipped: {err}")
    return paths


def _save(fig: Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def plot_layers(result: dict[str, Any], out: Path) -> Path:
    """Linear-probe and k-NN top-1 by depth, from ``sslkit eval layers``'s result -> ``out``."""
    layers = result["layers"]
    names = [f"{x['layer']}\n({x['dim']})" for x in layers]
    fig = Figure(figsize=(max(5.0, 0.9 * len(layers) + 2), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for key, label in (("linear_top1", "linear probe"), ("knn_top1", "k-NN")):
        ax.plot(range(len(layers)), [x[key] for x in layers], marker="o", label=label)
    ax.set_xticks(range(len(layers)), names, fontsize="small")
    ax.set_ylabel("test top-1")
    ax.set_xlabel("layer (feature dimensions)")
    ax.set_title("accuracy by depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, out)


def plot_suite(table: dict[str, dict[str, float]], out: Path) -> Path:
    """Grouped bars of ``sslkit eval suite``'s accuracies, one group per dataset -> ``out``."""
    columns = list(dict.fromkeys(c for row in table.values() for c in row if c != "RankMe"))
    fig = Figure(figsize=(max(5.0, 1.2 * len(columns) * len(table) + 2), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / max(1, len(columns))
    colours = colormaps["tab10"]
    for j, column in enumerate(columns):
        xs = [i + j * width for i, row in enumerate(table.values()) if column in row]
        ax.bar(xs, [row[column] for row in table.values() if column in row], width, label=column, color=colours(j % 10))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(table))], list(table), fontsize="small")
    ax.set_ylabel("test top-1")
    ax.set_ylim(0, 1)
    ax.set_title("evaluation suite")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="x-small", ncols=2)
    return _save(fig, out)
