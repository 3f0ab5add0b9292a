"""Two CPU processes with batch B per process must step exactly like one process with 2B,
for every method: gathered negatives carry their gradients, batch statistics and DINO's
centre are all-reduced, random draws (views, MAE's masks) do not depend on the split."""

from pathlib import Path

import pytest
import yaml
from accelerate.utils import set_seed
from safetensors.torch import load_file

from sslkit.config import load_config
from sslkit.engine import read_metrics
from sslkit.methods import METHODS, create_method
from tests.conftest import run_sslkit

pytestmark = pytest.mark.slow

# No BatchNorm: per-process statistics would (rightly) differ from one big batch.
EQUIVALENCE = ["model.norm=none", "method.proj_batch_norm=false", "eval.knn=false",
               "train.max_steps=3", "train.epochs=1", "train.batch_size=32", "optim.lr=2.0"]
TINY_VIT = ("model.backbone=vit_tiny_patch16_224", "model.timm_kwargs={img_size: 16, patch_size: 4, embed_dim: 32, "
            "depth: 2, num_heads: 2, global_pool: avg, fc_norm: false}")
# Per-method quirks of these tests only: at lr 2.0 Barlow Twins (and MAE) move their weights so far
# in 3 steps that float rounding grows past the tolerance.
QUIRKS = {"barlowtwins": ("optim.lr=0.5",), "mae": ("optim.lr=0.5",)}


def method_args(name: str) -> tuple[str, ...]:
    """Overrides that make method ``name`` test-sized, derived from its config's keys and its
    Fashion-MNIST recipe's backbone, so that every registered method is covered without a list:
    the method section is replaced as a whole (``method={name: ..., ...}``), its widths shrunk."""
    config = METHODS.config(name)
    keys = config.model_fields
    small = {"proj_hidden_dim": 32, "pred_hidden_dim": 32, "proj_layers": 2, "decoder_dim": 16, "decoder_depth": 1,
             "decoder_heads": 2,
             "proj_output_dim": 64 if "bottleneck_dim" in keys else 16, "bottleneck_dim": 16}
    section = {"name": name, **{k: v for k, v in small.items() if k in keys}}
    args = ["method=" + yaml.safe_dump(section, default_flow_style=True).strip()]
    if config.preset == "multicrop":
        args += ["augment.local_crops=2", "augment.local_size=8"]
    recipe = yaml.safe_load((Path(__file__).parents[1] / "recipes" / f"{name}_fashion_mnist.yaml").read_text())
    if recipe["model"]["backbone"].startswith("vit"):
        args += TINY_VIT
    return (*args, *QUIRKS.get(name, ()))


METHOD_ARGS = {name: method_args(name) for name in METHODS.names()}


def _train(tiny_recipe, out, name, processes, *extra):
    # a whole method section (method={...}) first, so that EQUIVALENCE's method keys apply to it
    # (and only the keys that method has: MAE's has no projection head)
    section = [a for a in extra if a.startswith("method=")]
    rest = [a for a in extra if not a.startswith("method=")]
    keys = METHODS.config(yaml.safe_load(section[0].split("=", 1)[1])["name"]).model_fields if section else {}
    equivalence = [a for a in EQUIVALENCE if not a.startswith("method.") or a.split("=")[0].split(".")[1] in keys]
    done = run_sslkit("train", str(tiny_recipe), "--num-processes", str(processes),
                      f"train.output_dir={out}", f"train.name={name}", *section, *equivalence, *rest)
    assert done.returncode == 0, done.stderr[-3000:]
    start = next(m for m in read_metrics(out / name) if m.get("event") == "start")
    assert start["world_size"] == processes  # really two processes, not one
    return load_file(out / name / "checkpoints" / "last" / "model.safetensors")


def _ssl(state):
    """The self-supervised weights (the online probe learns faster and would hide them)."""
    return {k: v for k, v in state.items() if not k.startswith("online_probe.")}


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _moved(state, run_dir):
    """How far training moved the self-supervised weights from their initialisation."""
    set_seed(0)
    init = create_method(load_config(run_dir / "config.yaml"), state["online_probe.weight"].shape[0]).state_dict()
    return _max_diff(_ssl(state), _ssl(init))


@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_two_processes_equal_one(tiny_recipe, tmp_path, method):
    args = METHOD_ARGS[method]
    one = _train(tiny_recipe, tmp_path, "p1", 1, *args)
    two = _train(tiny_recipe, tmp_path, "p2", 2, *args)
    moved = _moved(one, tmp_path / "p1")
    assert moved > 1e-3
    # every weight (teacher, online probe and DINO's centre included): the same steps up to float rounding
    assert one.keys() == two.keys()
    assert _max_diff(one, two) < 1e-3 * moved
    if method == "dino":
        assert (one["criterion.center"] != 0).any()  # the centre moved, and both runs agree on it


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_synchronised_batchnorm_two_processes_equal_one(tiny_recipe, tmp_path, method):
    """BatchNorm in the backbone and the heads (and BYOL's teacher), statistics over the global batch."""
    # lr 0.5: at 2.0, 3 steps through BatchNorm amplify float rounding to 1e-3 of the distance moved
    # (the ratio here is ~1e-6; without model.sync_batchnorm it is ~0.6)
    args = (*METHOD_ARGS[method], "model.norm=batch", "method.proj_batch_norm=true",
            "model.sync_batchnorm=true", "optim.lr=0.5")
    one = _train(tiny_recipe, tmp_path, "p1", 1, *args)
    two = _train(tiny_recipe, tmp_path, "p2", 2, *args)
    assert _max_diff(one, two) < 1e-3 * _moved(one, tmp_path / "p1")
    assert any("running_mean" in k for k in one)


def test_without_gathering_two_processes_differ(tiny_recipe, tmp_path):
    """Control: SimCLR without gathering contrasts only against each process's half, and
    the comparison above can tell."""
    one = _train(tiny_recipe, tmp_path, "p1", 1)
    local = _train(tiny_recipe, tmp_path, "p2_local", 2, "method.gather_distributed=false")
    assert _max_diff(_ssl(one), _ssl(local)) > 0.05 * _moved(one, tmp_path / "p1")
