"""Every method learns on a fixed batch, and trains through the CLI end to end."""

import math

import pytest
import torch

from sslkit.augment import create_augment
from sslkit.config import load_config
from sslkit.engine import read_metrics
from sslkit.engine.checkpoint import load_feature_model
from sslkit.methods import METHODS, create_method
from tests.conftest import run_sslkit_here, set_step
from tests.test_distributed import METHOD_ARGS

# The recipe keys of tests/conftest.py's TINY_RECIPE, as overrides, for building in-process.
TINY = ["model.backbone=tiny_cnn", "model.width=8", "augment.size=16", "method.proj_hidden_dim=32",
        "method.proj_output_dim=16"]


def _views_and_method(method: str):
    # BatchNorm in the heads that have it, as the Fashion-MNIST recipes on the tiny CNN (DINO's
    # paper default, none, lets a fixed batch's loss collapse onto the centre here)
    norm = ["method.proj_batch_norm=true"] if "proj_batch_norm" in METHODS.config(method).model_fields else []
    cfg = load_config(None, [*TINY, *METHOD_ARGS[method], *norm])
    torch.manual_seed(0)
    model = create_method(cfg, num_classes=10)
    images = torch.randint(0, 256, (32, 3, 24, 24), dtype=torch.uint8)
    views = create_augment(cfg.augment)(images, torch.Generator().manual_seed(0))
    return model, views


@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_loss_falls_on_a_fixed_batch(method):
    model, views = _views_and_method(method)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for step in range(20):
        set_step(model, step, steps_per_epoch=1, total_steps=20)
        model.generator = torch.Generator().manual_seed(1)  # MAE: the same masks every step
        loss = model(views)["loss"]
        optimizer.zero_grad()
        loss.backward()
        model.before_optimizer_step()
        optimizer.step()
        model.after_optimizer_step(torch.tensor(1.0))
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05 * abs(losses[0]), losses


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_trains_through_the_cli(tiny_recipe, tmp_path, method):
    # through the command line's entry point, in this process (tests/test_cli.py starts a fresh one)
    done = run_sslkit_here("train", str(tiny_recipe), f"train.output_dir={tmp_path}", "train.name=run",
                           "train.epochs=1", "train.max_steps=4", *METHOD_ARGS[method])
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    # each loss term is logged by name, and the terms add up to the loss
    logged = [m for m in metrics if "loss" in m]
    terms = [{k: v for k, v in m.items() if k.startswith("loss/")} for m in logged]
    assert all(terms) and all(math.isclose(sum(t.values()), m["loss"], rel_tol=1e-5, abs_tol=1e-6)
                              for t, m in zip(terms, logged))
    # every schedule is logged by name: the optimiser's and the method's own
    config = METHODS.config(method)
    expected = {"lr", "weight_decay"} | ({"momentum"} if "momentum_base" in config.model_fields else set())
    assert all(expected <= m.keys() for m in logged), expected
    assert [m["knn_top1"] for m in metrics if "knn_top1" in m]  # k-NN ran on the feature model
    # The exported backbone is the method's k-NN feature network (DINO: the teacher's).
    _, from_checkpoint = load_feature_model(tmp_path / "run" / "checkpoints" / "last")
    _, exported = load_feature_model(tmp_path / "run" / "backbone.safetensors")
    images = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(exported.eval()(images), from_checkpoint.eval()(images))
