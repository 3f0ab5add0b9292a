"""The loop's options through the CLI: optimisers, bf16 autocast, accumulation, clipping. Both runs
in this process, one after the other with different precisions, as in a notebook or a sweep."""

import math

import pytest

from sslkit.engine import read_metrics
from tests.conftest import run_sslkit_here

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "options",
    [
        ["optim.name=lars", "train.precision=bf16", "optim.clip_grad_norm=1.0"],
        ["optim.name=adamw", "optim.lr=0.001", "train.grad_accum_steps=2", "optim.warmup_epochs=1"],
    ],
)
def test_loop_options(tiny_recipe, tmp_path, options):
    done = run_sslkit_here("train", str(tiny_recipe), f"train.output_dir={tmp_path}", "train.name=r",
                           "eval.knn=false", "data.train_limit=256", *options)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(tmp_path / "r")
    start = next(m for m in metrics if m.get("event") == "start")
    # 256 images, global batch 64: 4 optimiser steps an epoch whatever the accumulation
    assert start["total_steps"] == 2 * 4
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [2, 4, 6, 8]
    assert all(math.isfinite(m["loss"]) for m in steps)
    # each logged lr is the one its step used: step s (1-based) ran with the schedule's value at s - 1
    lrs = [m["lr"] for m in steps]
    if "optim.warmup_epochs=1" in options:
        assert lrs[0] == pytest.approx(0.001 * 2 / 4)  # the 2nd step of a 4-step linear warm-up
        assert lrs[-1] == pytest.approx(0.001 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))  # then 3/4 down the cosine
    else:
        assert lrs[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))  # the cosine to 0 at step 8
