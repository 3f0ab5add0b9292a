"""Two CPU processes with batch B per process must step exactly like one process with 2B,
for every method: gathered negatives carry their gradients, batch statistics and DINO's
centre are all-reduced, random draws (views, MAE's masks) do not depend on the split.

Every case trains in this process (one process) and in two forked gloo workers (two processes),
through the whole trainer (``sslkit.engine.train``): one fork for all cases rather than a
launch per case (each launch re-imports torch and sslkit in three processes, ~1 minute on a
2-core machine). One run goes through ``sslkit train --num-processes 2`` for the launcher."""

from functools import partial
from pathlib import Path

import pytest
import yaml
from accelerate.utils import set_seed
from safetensors.torch import load_file

from sslkit.config import load_config
from sslkit.engine import read_metrics, train
from sslkit.methods import METHODS, create_method
from tests.conftest import TINY_RECIPE, run_gloo_workers, run_sslkit, train_as_launched

pytestmark = pytest.mark.slow

# No BatchNorm: per-process statistics would (rightly) differ from one big batch.
EQUIVALENCE = ["model.norm=none", "method.proj_batch_norm=false", "eval.knn=false",
               "train.max_steps=3", "train.epochs=1", "train.batch_size=32", "optim.lr=2.0"]
TINY_VIT = ("model.backbone=vit_tiny_patch16_224", "model.timm_kwargs={img_size: 16, patch_size: 4, embed_dim: 32, "
            "depth: 2, num_heads: 2, global_pool: avg, fc_norm: false}")
# Per-method quirks of these tests only: at lr 2.0 Barlow Twins (and MAE) move their weights so far
# in 3 steps that float rounding grows past the tolerance.
# iBOT and DINOv2 take multi-size views through one ViT, and have a patch head of their own;
# DINOv2's KoLeo searches neighbours in the global batch here (dinov2's default: per process);
# I-JEPA's predictor is shrunk and its context may keep few of the 16 patches.
# SwAV's queue fills from the first step and is in use from the third (batch 32), so that its
# share per process is tested too.
MULTICROP_VIT = ("model.timm_kwargs.dynamic_img_size=true", "method.patch_output_dim=64")
QUIRKS = {"barlowtwins": ("optim.lr=0.5",), "mae": ("optim.lr=0.5",), "ibot": MULTICROP_VIT,
          "dinov2": (*MULTICROP_VIT, "method.koleo_gather_distributed=true"),
          "ijepa": ("method.pred_dim=16", "method.pred_depth=1", "method.min_keep=2"),
          "swav": ("method.queue_length=64", "method.queue_start_epochs=0")}


def method_args(name: str) -> tuple[str, ...]:
    """Overrides that make method ``name`` test-sized, derived from its config's keys and its
    Fashion-MNIST recipe's backbone, so that every registered method is covered without a list:
    the method section is replaced as a whole (``method={name: ..., ...}``), its widths shrunk."""
    config = METHODS.config(name)
    keys = config.model_fields
    small = {"proj_hidden_dim": 32, "pred_hidden_dim": 32, "proj_layers": 2, "decoder_dim": 16, "decoder_depth": 1,
             "decoder_heads": 2, "prototypes": 32, "queue_length": 256, "support_set_size": 256,
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


# The cases trained with 1 and with 2 processes: every registered method, synchronised BatchNorm
# (BatchNorm in the backbone and the heads, and BYOL's teacher and MoCo v2's key encoder, its
# alternative to shuffled BN; lr 0.5: at 2.0, 3 steps through
# BatchNorm amplify float rounding to 1e-3 of the distance moved; the ratio here is ~1e-6, without
# model.sync_batchnorm ~0.6), and the control: SimCLR without gathering.
SYNC_BN = ("model.norm=batch", "method.proj_batch_norm=true", "model.sync_batchnorm=true", "optim.lr=0.5")
CASES = {
    **METHOD_ARGS,
    **{f"{m}_sync_batchnorm": (*METHOD_ARGS[m], *SYNC_BN) for m in ("simclr", "byol", "mocov2")},
    "simclr_local": (*METHOD_ARGS["simclr"], "method.gather_distributed=false"),
}


def _overrides(out: Path, name: str, extra: tuple[str, ...]) -> list[str]:
    # a whole method section (method={...}) first, so that EQUIVALENCE's method keys apply to it
    # (and only the keys that method has: MAE's has no projection head)
    section = [a for a in extra if a.startswith("method=")]
    rest = [a for a in extra if not a.startswith("method=")]
    keys = METHODS.config(yaml.safe_load(section[0].split("=", 1)[1])["name"]).model_fields if section else {}
    equivalence = [a for a in EQUIVALENCE if not a.startswith("method.") or a.split("=")[0].split(".")[1] in keys]
    return [f"train.output_dir={out}", f"train.name={name}", *section, *equivalence, *rest]


def _weights(run_dir: Path, processes: int) -> dict:
    start = next(m for m in read_metrics(run_dir) if m.get("event") == "start")
    assert start["world_size"] == processes  # really that many processes
    return load_file(run_dir / "checkpoints" / "last" / "model.safetensors")


def _train_cases(recipe: str, out: str, processes: int, rank: int = 0) -> dict:
    """Train every case (``sslkit.engine.train``, the whole trainer) in this process, or as one of
    ``processes`` forked workers; rank 0 returns each case's final weights."""
    weights = {}
    for case, args in CASES.items():
        name = f"p{processes}_{case}"
        cfg = load_config(recipe, _overrides(Path(out), name, args))
        train(cfg) if processes == 1 else train_as_launched(cfg)
        if rank == 0:
            weights[case] = _weights(Path(out) / name, processes)
    return weights


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_RECIPE))
    return path


@pytest.fixture(scope="module")
def one(recipe, tmp_path_factory) -> dict:
    return _train_cases(str(recipe), str(tmp_path_factory.mktemp("one")), 1)


@pytest.fixture(scope="module")
def two(recipe, tmp_path_factory) -> dict:
    """Every case with 2 processes: two forked workers in one gloo group (no start-up per case)."""
    out = tmp_path_factory.mktemp("two")
    return run_gloo_workers(partial(_train_cases, str(recipe), str(out), 2), out)[0]


def _ssl(state):
    """The self-supervised weights (the online probe learns faster and would hide them)."""
    return {k: v for k, v in state.items() if not k.startswith("online_probe.")}


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _moved(recipe, one, case):
    """How far training moved the case's self-supervised weights from their initialisation."""
    set_seed(0)
    cfg = load_config(recipe, _overrides(Path("unused"), "unused", CASES[case]))
    init = create_method(cfg, one[case]["online_probe.weight"].shape[0]).state_dict()
    return _max_diff(_ssl(one[case]), _ssl(init))


@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_two_processes_equal_one(recipe, one, two, method):
    moved = _moved(recipe, one, method)
    assert moved > 1e-3
    # every weight (teacher, online probe and DINO's centre included): the same steps up to float rounding
    assert one[method].keys() == two[method].keys()
    assert _max_diff(one[method], two[method]) < 1e-3 * moved
    if method in ("dino", "ibot"):
        assert (one[method]["criterion.center"] != 0).any()  # the centre moved, and both runs agree on it
    if method == "ibot":
        # the patch centre too (the masked rows of both processes)
        assert (one[method]["patch_criterion.center"] != 0).any()


@pytest.mark.parametrize("method", ["simclr", "byol", "mocov2"])
def test_synchronised_batchnorm_two_processes_equal_one(recipe, one, two, method):
    case = f"{method}_sync_batchnorm"
    assert _max_diff(one[case], two[case]) < 1e-3 * _moved(recipe, one, case)
    assert any("running_mean" in k for k in one[case])


def test_without_gathering_two_processes_differ(recipe, one, two):
    """Control: SimCLR without gathering contrasts only against each process's half, and
    the comparison above can tell (one process: the same whether it gathers or not)."""
    assert _max_diff(_ssl(one["simclr_local"]), _ssl(two["simclr_local"])) > 0.05 * _moved(recipe, one, "simclr")


def test_the_launcher_starts_two_processes_that_step_as_one(recipe, one, tmp_path):
    """The same through the command line: ``sslkit train --num-processes 2`` (accelerate's
    launcher, two fresh processes) takes the in-process single-process run's steps."""
    done = run_sslkit("train", str(recipe), "--num-processes", "2",
                      *_overrides(tmp_path, "cli", METHOD_ARGS["simclr"]))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _max_diff(one["simclr"], _weights(tmp_path / "cli", 2)) < 1e-3 * _moved(recipe, one, "simclr")
