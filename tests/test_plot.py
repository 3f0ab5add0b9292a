import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.image import imread

from sslkit.errors import UserError
from sslkit.config import AugmentConfig, Config, DataConfig, ModelConfig
from sslkit.data import load_dataset
from sslkit.engine.checkpoint import export_backbone
from sslkit.methods import create_method
from sslkit.plot import metric_panels, plot_curves, plot_embedding, plot_run, project_2d

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# What a 2-epoch run with 4 steps per epoch logs (see sslkit.engine.trainer.train).
EVENTS = [
    {"step": 0, "epoch": 0, "knn_top1": 0.30, "knn_top5": 0.70, "knn_top1_k200": 0.28},
    {"step": 0, "epoch": 0, "event": "start", "world_size": 1, "total_steps": 8, "batch_size": 64},
    {"step": 2, "epoch": 0, "loss": 4.0, "lr": 0.10, "img_per_s": 500.0},
    {"step": 4, "epoch": 0, "loss": 3.5, "lr": 0.08, "img_per_s": 510.0},
    {"step": 4, "epoch": 0, "event": "epoch_end", "train_seconds": 1.0, "epoch_img_per_s": 505.0},
    {"step": 4, "epoch": 1, "knn_top1": 0.50, "knn_top5": 0.85, "knn_top1_k200": 0.47},
    {"step": 6, "epoch": 1, "loss": 3.2, "lr": 0.03, "img_per_s": 520.0},
    {"step": 8, "epoch": 1, "loss": 3.0, "lr": 0.00, "img_per_s": 530.0},
    {"step": 8, "epoch": 1, "event": "epoch_end", "train_seconds": 1.0, "epoch_img_per_s": 525.0},
    {"step": 8, "epoch": 2, "knn_top1": 0.60, "knn_top5": 0.90, "knn_top1_k200": 0.55},
    {"step": 8, "epoch": 2, "event": "end"},
]
TRAINING_ONLY = [e for e in EVENTS if not any(k.startswith("knn_") for k in e)]


def write_metrics(run_dir: Path, events: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def tiny_config() -> Config:
    return Config(
        data=DataConfig(name="synthetic"), model=ModelConfig(backbone="tiny_cnn", width=8),
        augment=AugmentConfig(size=16),
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A finished run made by hand: metrics and an exported (untrained) tiny backbone."""
    run = tmp_path / "runs" / "tiny"
    write_metrics(run, EVENTS)
    cfg = tiny_config()
    export_backbone(create_method(cfg), cfg, run / "backbone.safetensors")
    return run


def read_png(path: Path) -> np.ndarray:
    """(H, W, 4) float pixels of a PNG, after checking it is one with more than one colour."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 10  # drawn on, not blank
    return image


def test_curves_png_has_one_panel_per_present_metric(run_dir: Path, tmp_path: Path) -> None:
    path = plot_curves(run_dir)
    assert path == run_dir / "plots" / "curves.png"
    full = read_png(path)

    write_metrics(tmp_path / "no_knn", TRAINING_ONLY)
    lean = read_png(plot_curves(tmp_path / "no_knn"))
    # Panels stack vertically at a fixed height each: loss, lr, k-NN (3) against loss, lr (2).
    assert full.shape[1] == lean.shape[1]
    assert full.shape[0] / lean.shape[0] == pytest.approx(3 / 2, rel=0.02)


def test_metric_panels_group_keys_and_skip_absent_metrics() -> None:
    panels = metric_panels(EVENTS)
    assert list(panels) == ["loss", "learning rate", "k-NN accuracy (test)"]
    assert list(panels["k-NN accuracy (test)"]) == ["knn_top1", "knn_top1_k200", "knn_top5"]
    assert panels["loss"]["loss"] == ([2, 4, 6, 8], [4.0, 3.5, 3.2, 3.0])
    assert panels["k-NN accuracy (test)"]["knn_top1"] == ([0, 4, 8], [0.30, 0.50, 0.60])

    assert list(metric_panels(TRAINING_ONLY)) == ["loss", "learning rate"]
    online = metric_panels(TRAINING_ONLY + [{"step": 8, "epoch": 2, "online_top1": 0.4}])
    assert list(online) == ["loss", "learning rate", "online top-1"]


def test_metric_panels_keep_the_latest_value_of_a_relogged_step() -> None:
    # A run resumed from its step-4 checkpoint logs steps 6 and 8 again, then goes on.
    resumed = EVENTS + [{"step": 6, "epoch": 1, "loss": 2.9, "lr": 0.03}, {"step": 10, "epoch": 2, "loss": 2.5}]
    assert metric_panels(resumed)["loss"]["loss"] == ([2, 4, 6, 8, 10], [4.0, 3.5, 2.9, 3.0, 2.5])


def test_missing_metrics_is_an_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="sslkit train") as err:
        plot_curves(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "metrics.jsonl") in str(err.value)


def test_project_2d_recovers_a_plane_and_its_variance_order() -> None:
    # Points on a plane through an offset in R^6, spread 3x more along one in-plane axis.
    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(6, 2, generator=gen, dtype=torch.float64))  # (6, 2) orthonormal
    coeffs = torch.randn(500, 2, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 1.0])  # (500, 2)
    points = coeffs @ basis.T + 5.0  # (500, 6)

    xy = project_2d(points)
    assert xy.shape == (500, 2)
    assert torch.allclose(xy.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-9)
    # Nothing lies off the plane, so the projection keeps every distance.
    mode = "donot_use_mm_for_euclid_dist"  # exact differences, not the faster |a|^2 - 2ab + |b|^2
    assert torch.allclose(torch.cdist(xy, xy, compute_mode=mode), torch.cdist(points, points, compute_mode=mode))
    var = xy.var(0)
    assert var[0] > 5 * var[1]
    assert torch.allclose(var, coeffs.var(0).sort(descending=True).values, rtol=0.1)


def test_project_2d_separates_synthetic_classes() -> None:
    data = load_dataset(DataConfig(name="synthetic", image_size=8), "test")  # 10 classes, separable on raw pixels
    xy = project_2d(F.normalize(data.images.flatten(1).float(), dim=1))  # (256, 192) -> (256, 2)
    assert (xy.var(0) > 0).all()
    means = torch.stack([xy[data.labels == c].mean(0) for c in range(10)])  # (10, 2)
    between = means.var(0).sum() / xy.var(0).sum()
    assert between > 0.5  # the two axes carry class structure (random labels give about 0.03)


def test_plot_embedding_writes_a_scatter(run_dir: Path) -> None:
    path = plot_embedding(run_dir, limit=200)
    assert path == run_dir / "plots" / "embedding.png"
    read_png(path)


def test_plot_embedding_without_backbone_is_an_error(run_dir: Path) -> None:
    (run_dir / "backbone.safetensors").unlink()
    with pytest.raises(UserError, match="backbone.safetensors"):
        plot_embedding(run_dir)


def test_plot_run_writes_both_or_says_why_not(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plots = run_dir / "plots"
    assert plot_run(str(run_dir), limit=100) == [plots / "curves.png", plots / "embedding.png"]

    (run_dir / "backbone.safetensors").unlink()
    (plots / "curves.png").unlink()
    assert plot_run(run_dir) == [plots / "curves.png"]
    assert (plots / "curves.png").is_file()
    assert "embedding skipped" in capsys.readouterr().out
