import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# A recipe small enough for a test: synthetic data, a tiny CNN, 16 px views.
TINY_RECIPE = {
    "data": {"name": "synthetic"},
    "model": {"backbone": "tiny_cnn", "width": 8},
    "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16, "temperature": 0.5},
    "augment": {"size": 16},
    "optim": {"name": "sgd", "lr": 0.1, "lr_batch_size": None},
    "train": {"epochs": 2, "batch_size": 64, "log_every_steps": 2, "progress": False},
    "eval": {"batch_size": 256},
}


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_RECIPE))
    return path


@pytest.fixture
def no_default_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide the machine's data folders and $SSLKIT_DATA so a test sees only its own files."""
    from sslkit.data import datasets

    monkeypatch.setattr(datasets, "SYSTEM_DATA_DIR", tmp_path / "system")
    monkeypatch.setattr(datasets, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.delenv("SSLKIT_DATA", raising=False)


def run_sslkit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m sslkit ARGS`` in a fresh process, as a user runs it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sslkit", *args], capture_output=True, text=True,
                          env=full_env, timeout=600)
