"""``sslkit eval suite``: protocols x datasets, skipped datasets listed, numbers as the single commands give."""

import json
from pathlib import Path

import pytest
import torch
import torchvision.io as tio

from tests.conftest import TINY_RECIPE, run_sslkit_here


def _write_folder(root: Path) -> None:
    """Two classes (dark and bright images) in train/ and val/ folders, PNG files."""
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("val", 6)):
        for label, base in (("dark", 40), ("bright", 200)):
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                image = (base + 30 * torch.randn(3, 20, 20, generator=gen)).clamp(0, 255).to(torch.uint8)
                tio.write_png(image, str(root / split / label / f"{i}.png"))


def test_suite_reports_every_dataset_and_protocol_and_lists_the_skipped(tiny_run, tmp_path, no_default_places):
    _write_folder(tmp_path / "pets")
    out = tmp_path / "suite"
    missing = tmp_path / "nowhere"
    done = run_sslkit_here("eval", "suite", "--checkpoint", str(tiny_run / "checkpoints" / "last"),
                           "--data", "synthetic", f"image_folder:{tmp_path / 'pets'}", f"cifar10:{missing}",
                           "--protocols", "knn", "linear", "layers", "--output", str(out), "data.image_size=16")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    folder = f"image_folder:{tmp_path / 'pets'}"
    assert list(report["datasets"]) == ["synthetic", folder]
    assert list(report["skipped"]) == [f"cifar10:{missing}"] and str(missing) in report["skipped"][f"cifar10:{missing}"]
    for entry in report["datasets"].values():
        assert set(entry["results"]) == {"knn", "linear", "layers"}
        assert 1 <= entry["rankme"] <= 8 * TINY_RECIPE["model"]["width"]
    assert report["datasets"][folder]["results"]["knn"]["knn_top1"] > 0.9  # dark vs bright
    md = (out / "report.md").read_text()
    assert "| dataset | knn | linear |" in md and "| synthetic |" in md and "Skipped:" in md and "cifar10:" in md
    assert "layer projection" in md and "RankMe" in md
    assert (out / "report.png").stat().st_size > 0
    # the same numbers as the single commands on the same data
    for protocol, key in (("knn", "knn_top1"), ("linear", "top1")):
        single = tmp_path / f"{protocol}.json"
        assert run_sslkit_here("eval", protocol, "--checkpoint", str(tiny_run / "checkpoints" / "last"),
                               "--data", "synthetic", "--output", str(single), "data.image_size=16").returncode == 0
        suite = report["datasets"]["synthetic"]["results"][protocol][key]
        assert json.loads(single.read_text())[key] == pytest.approx(suite)


def test_suite_refuses_an_unknown_protocol(tiny_run, tmp_path):
    done = run_sslkit_here("eval", "suite", "--checkpoint", str(tiny_run / "backbone.safetensors"), "--data",
                           "synthetic", "--protocols", "knn", "linaer", "--output", str(tmp_path))
    assert done.returncode == 2 and "invalid choice: 'linaer'" in done.stderr
