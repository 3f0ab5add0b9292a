"""The loop's options through the CLI: optimisers, bf16 autocast, accumulation, clipping."""

import math

import pytest

from sslkit.engine import read_metrics
from tests.conftest import run_sslkit

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "options",
    [
        ["optim.name=lars", "train.precision=bf16", "optim.clip_grad_norm=1.0"],
        ["optim.name=adamw", "optim.lr=0.001", "train.grad_accum_steps=2", "optim.warmup_epochs=1"],
    ],
)
def test_loop_options(tiny_recipe, tmp_path, options):
    done = run_sslkit("train", str(tiny_recipe), f"train.output_dir={tmp_path}", "train.name=r",
                      "eval.knn=false", "data.train_limit=256", *options)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(tmp_path / "r")
    start = next(m for m in metrics if m.get("event") == "start")
    # 256 images, global batch 64: 4 optimiser steps an epoch whatever the accumulation
    assert start["total_steps"] == 2 * 4
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [2, 4, 6, 8]
    assert all(math.isfinite(m["loss"]) for m in steps)
    lrs = [m["lr"] for m in steps]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # the cosine ends at min_lr_ratio=0
    if "optim.warmup_epochs=1" in options:
        assert lrs[0] == pytest.approx(0.001 * 3 / 4)  # step 2 of a 4-step linear warm-up
