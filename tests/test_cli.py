"""End to end through the command line: train, checkpoints, export, eval, resume, bad input."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sslkit.config import ModelConfig
from sslkit.engine import read_metrics
from sslkit.engine.checkpoint import load_feature_model
from sslkit.models import create_backbone
from tests.conftest import TINY_RECIPE, run_sslkit, run_sslkit_here

pytestmark = pytest.mark.slow


FMNIST = ["data.name=fashion_mnist", "data.train_limit=2048", "data.test_limit=512"]


def test_train_eval_export_resume(tiny_recipe, tmp_path):
    """Real data (a Fashion-MNIST subset), so that k-NN scores are not trivially perfect. The
    first command in a fresh process, as a user runs it; the rest through the same entry point
    in this process (no start-up each)."""
    if not Path("/usr/share/datasets/fashion-mnist").is_dir() and "SSLKIT_DATA" not in os.environ:
        pytest.skip("Fashion-MNIST is not installed (make test installs it)")
    out = tmp_path / "runs"
    done = run_sslkit("train", str(tiny_recipe), f"train.output_dir={out}", "train.name=t",
                      "eval.collapse_every_steps=8", *FMNIST)
    assert done.returncode == 0, done.stderr
    run = out / "t"
    assert "k-NN untrained network" in done.stdout and "k-NN after epoch 2" in done.stdout

    metrics = read_metrics(run)
    knn = [m for m in metrics if "knn_top1" in m]
    losses = [m for m in metrics if "loss" in m]
    assert [m["epoch"] for m in knn] == [0, 1, 2]  # untrained, then after each epoch
    assert all(0.3 < m["knn_top1"] < m["knn_top5"] <= 1.0 for m in knn)
    assert knn[0]["knn_top1"] < 0.99  # real data: the scores below compare something
    assert losses and all(torch.isfinite(torch.tensor(m["loss"])) for m in losses)
    assert all({"step", "epoch", "lr", "img_per_s", "online_top1"} <= m.keys() for m in losses)
    # online_top1 is a count over the window's log_every_steps x batch_size = 128 samples (a wrong
    # denominator or a counter not reset between windows fails), and the probe learns: well above
    # chance (10 classes) by the end (measured: 0.07 in the first window, ~0.4 in the last eight).
    window = TINY_RECIPE["train"]["log_every_steps"] * TINY_RECIPE["train"]["batch_size"]
    assert all((m["online_top1"] * window).is_integer() for m in losses)
    assert sum(m["online_top1"] for m in losses[-8:]) / 8 > 0.25
    collapse = [m for m in metrics if "eff_rank" in m]
    assert collapse and all(m["step"] % 8 == 0 and m["emb_std"] > 0 for m in collapse)
    start = next(m for m in metrics if m.get("event") == "start")
    assert start["world_size"] == 1

    # checkpoints/last -> the newest epoch, in safetensors, with the config beside it
    last = run / "checkpoints" / "last"
    assert last.resolve().name == "epoch_0002"
    assert (last / "model.safetensors").is_file() and (last / "config.yaml").is_file()

    # the exported backbone loads without the checkpoint and computes the same features
    backbone = create_backbone(ModelConfig(backbone="tiny_cnn", width=8))
    backbone.load_state_dict(load_file(run / "backbone.safetensors"))
    _, from_ckpt = load_feature_model(last)
    x = torch.randn(4, 3, 16, 16)
    backbone.eval(), from_ckpt.eval()
    assert torch.allclose(backbone(x), from_ckpt(x))

    # eval knn on the checkpoint reproduces the k-NN the run logged after its last epoch
    done = run_sslkit_here("eval", "knn", "--checkpoint", str(last), "--data", "fashion_mnist",
                      "--bank-limit", "2048", "--test-limit", "512", "eval.batch_size=256")  # an override too
    assert done.returncode == 0, done.stderr
    result = json.loads((last / "knn_fashion_mnist.json").read_text())
    assert result["knn_top1"] == pytest.approx(knn[-1]["knn_top1"])
    assert "top-1" in done.stdout

    # linear probe and few-shot on the exported backbone; plots of the run
    backbone_file = str(run / "backbone.safetensors")
    limits = ["--data", "fashion_mnist", "--bank-limit", "2048", "--test-limit", "512"]
    done = run_sslkit_here("eval", "linear", "--checkpoint", backbone_file, *limits,
                      "--epochs", "10", "--lrs", "0.01", "0.1")
    assert done.returncode == 0, done.stderr
    linear = json.loads((run / "linear_fashion_mnist.json").read_text())
    assert set(linear["per_lr"]) == {"0.01", "0.1"} and linear["top1"] > 0.5  # 10 classes: chance is 0.1
    done = run_sslkit_here("eval", "fewshot", "--checkpoint", backbone_file, *limits,
                      "--shots", "1", "5", "--seeds", "0", "1")
    assert done.returncode == 0, done.stderr
    fewshot = json.loads((run / "fewshot_fashion_mnist.json").read_text())
    assert fewshot["5"]["mean_top1"] > fewshot["1"]["mean_top1"] > 0.1 and len(fewshot["5"]["runs"]) == 2
    # eval's options and overrides are validated as train's: one line naming the key
    for bad in (["--k", "0"], ["eval.knn_kk=5"]):
        done = run_sslkit_here("eval", "knn", "--checkpoint", backbone_file, *limits, *bad)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert ("eval.knn_k=0" if bad[0] == "--k" else "did you mean 'eval.knn_k'") in done.stderr
    done = run_sslkit_here("plot", str(run), "--limit", "256")
    assert done.returncode == 0, done.stderr
    for name in ("curves.png", "embedding.png"):
        assert (run / "plots" / name).stat().st_size > 1000

    # the same run again is refused; resume continues it to epoch 3
    again = run_sslkit_here("train", str(tiny_recipe), f"train.output_dir={out}", "train.name=t", *FMNIST)
    assert again.returncode == 2 and "resume=true" in again.stderr
    steps_before = max(m["step"] for m in metrics)
    done = run_sslkit_here("train", str(tiny_recipe), f"train.output_dir={out}", "train.name=t",
                      "train.epochs=3", "resume=true", *FMNIST)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    new = read_metrics(run)[len(metrics):]
    assert [m["epoch"] for m in new if "knn_top1" in m] == [3]  # no second untrained score
    assert min(m["step"] for m in new if "loss" in m) > steps_before
    assert last.resolve().name == "epoch_0003"

    # a checkpoint of another model is refused by name, not with a shape error
    other = run_sslkit_here("train", str(tiny_recipe), f"train.output_dir={out}", "train.name=t",
                       "train.epochs=4", "resume=true", "model.width=16", *FMNIST)
    assert other.returncode == 2 and "model.width" in other.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["optim.lrr=0.1"], ["unknown config key 'optim.lrr'", "did you mean 'optim.lr'"]),
        (["data.name=cifar10", "data.root=/nonexistent/cifar"], ["/nonexistent/cifar", "cifar-10"]),
        (["method.name=simclrr"], ["did you mean 'simclr'"]),
    ],
)
def test_bad_input_is_one_clear_error(tiny_recipe, tmp_path, args, words):
    done = run_sslkit_here("train", str(tiny_recipe), f"train.output_dir={tmp_path}", *args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in done.stderr


def test_eval_missing_checkpoint(tmp_path):
    # a fresh process: the exit status the shell sees
    done = run_sslkit("eval", "knn", "--checkpoint", str(tmp_path / "nope"), "--data", "synthetic")
    assert done.returncode == 2 and "nope" in done.stderr and "backbone.safetensors" in done.stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only bad input (a UserError) becomes one `sslkit: error:` line; any other exception is a
    bug and propagates with its traceback."""
    from sslkit import cli
    from sslkit.errors import UserError

    def bug(args):
        raise ValueError("an internal mistake")

    monkeypatch.setattr(cli, "_plot", bug)
    with pytest.raises(ValueError, match="an internal mistake"):
        cli.main(["plot", "runs/x"])

    def bad_input(args):
        raise UserError("runs/x is not a run directory")

    monkeypatch.setattr(cli, "_plot", bad_input)
    assert cli.main(["plot", "runs/x"]) == 2
