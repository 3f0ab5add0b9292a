"""``train.compile``: the compiled run computes what the eager run does and saves the same
checkpoints; where torch.compile cannot run, training goes on eagerly and says so."""

import pytest
import torch
from safetensors.torch import load_file

from sslkit.config import load_config
from sslkit.engine import compile as compile_module
from sslkit.engine import read_metrics, train


def _run(tiny_recipe, tmp_path, name, *extra):
    cfg = load_config(tiny_recipe, [f"train.output_dir={tmp_path}", f"train.name={name}", "eval.knn=false",
                                    "train.max_steps=3", "train.log_every_steps=1", *extra])
    train(cfg)
    return read_metrics(tmp_path / name), tmp_path / name


@pytest.mark.skipif(compile_module.compile_unavailable(torch.device("cpu")) is not None,
                    reason="inductor cannot compile on this machine")
def test_compiled_training_matches_eager(tiny_recipe, tmp_path):
    eager, eager_dir = _run(tiny_recipe, tmp_path, "eager")
    compiled, compiled_dir = _run(tiny_recipe, tmp_path, "compiled", "train.compile=true")
    assert [m["compiled"] for m in compiled if m.get("event") == "start"] == [True]
    losses = [[m["loss"] for m in run if "loss" in m] for run in (eager, compiled)]
    assert len(losses[0]) == 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)  # inductor reorders float sums, nothing more
    a, b = (load_file(d / "backbone.safetensors") for d in (eager_dir, compiled_dir))
    assert a.keys() == b.keys()  # compiled in place: no _orig_mod prefixes in checkpoints or exports
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)


def test_compile_falls_back_to_eager_with_a_warning(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(compile_module, "compile_unavailable", lambda device: "no C++ compiler found (test)")
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler found \(test\): training without torch.compile"):
        metrics, _ = _run(tiny_recipe, tmp_path, "fallback", "train.compile=true")
    assert [m["compiled"] for m in metrics if m.get("event") == "start"] == [False]
    assert len([m for m in metrics if "loss" in m]) == 3
