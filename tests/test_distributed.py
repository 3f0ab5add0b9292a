"""Two CPU processes with batch B per process must step exactly like one process with 2B."""

import pytest
from accelerate.utils import set_seed
from safetensors.torch import load_file

from sslkit.config import load_config
from sslkit.engine import read_metrics
from sslkit.methods import create_method
from tests.conftest import run_sslkit

pytestmark = pytest.mark.slow

# No BatchNorm: per-process statistics would (rightly) differ from one big batch.
EQUIVALENCE = ["model.norm=none", "method.proj_batch_norm=false", "eval.knn=false",
               "train.max_steps=3", "train.epochs=1", "train.batch_size=32", "optim.lr=2.0"]


def _train(tiny_recipe, out, name, processes, *extra):
    done = run_sslkit("train", str(tiny_recipe), "--num-processes", str(processes),
                      f"train.output_dir={out}", f"train.name={name}", *EQUIVALENCE, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    start = next(m for m in read_metrics(out / name) if m.get("event") == "start")
    assert start["world_size"] == processes  # really two processes, not one
    return load_file(out / name / "checkpoints" / "last" / "model.safetensors")


def _ssl(state):
    """The self-supervised weights (the online probe learns faster and would hide them)."""
    return {k: v for k, v in state.items() if not k.startswith("online_probe.")}


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_processes_equal_one(tiny_recipe, tmp_path):
    one = _train(tiny_recipe, tmp_path, "p1", 1)
    two = _train(tiny_recipe, tmp_path, "p2", 2)
    # Control: without gathering, each process only contrasts against its own half.
    local = _train(tiny_recipe, tmp_path, "p2_local", 2, "method.gather_distributed=false")

    set_seed(0)
    # (the online probe is part of the model, and must match too)
    classes = one["online_probe.weight"].shape[0]
    init = create_method(load_config(tmp_path / "p1" / "config.yaml"), classes).state_dict()
    moved = _max_diff(_ssl(one), _ssl(init))
    assert moved > 1e-3
    assert _max_diff(one, two) < 1e-3 * moved  # the same steps, up to float rounding
    assert _max_diff(_ssl(one), _ssl(local)) > 0.05 * moved  # the test can tell a wrong gradient
