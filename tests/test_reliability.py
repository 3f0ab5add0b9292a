"""Exact resume after SIGKILL, a clean stop on SIGTERM, and the non-finite guard."""

import itertools
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sslkit.config import load_config
from sslkit.engine import read_metrics, train
from sslkit.engine.guards import NonFiniteError
from sslkit.methods.simclr import SimCLR
from tests.conftest import run_sslkit
from tests.test_distributed import METHOD_ARGS

# 16 steps per epoch, a mid-epoch checkpoint every 6 steps, no k-NN (it does not touch the
# training state, and costs time).
RESUMABLE = ["data.train_limit=1024", "train.epochs=2", "train.checkpoint_every_steps=6", "eval.knn=false",
             "train.keep_checkpoints=3"]


def _start(tiny_recipe, out, name, *extra):
    """``sslkit train`` in the background, as a scheduler would start it."""
    args = [sys.executable, "-m", "sslkit", "train", str(tiny_recipe), f"train.output_dir={out}",
            f"train.name={name}", *RESUMABLE, *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for_checkpoint(run_dir, process, timeout=300.0):
    """The first mid-epoch checkpoint's directory, as soon as ``last`` points at it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = run_dir / "checkpoints" / "last"
        if last.exists() and "_step_" in last.resolve().name:
            return last.resolve()
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.02)
    raise TimeoutError("no mid-epoch checkpoint appeared")


def _final_weights(run_dir):
    return load_file(run_dir / "checkpoints" / "last" / "model.safetensors")


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tiny_recipe, tmp_path, method):
    extra = METHOD_ARGS[method]
    killed = _start(tiny_recipe, tmp_path, "killed", *extra)
    resumed_from = _wait_for_checkpoint(tmp_path / "killed", killed)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    done = run_sslkit("train", str(tiny_recipe), f"train.output_dir={tmp_path}", "train.name=killed",
                      *RESUMABLE, *extra, "resume=true")
    assert done.returncode == 0, done.stderr[-3000:]
    resume = next(m for m in read_metrics(tmp_path / "killed") if m.get("event") == "resume")
    assert 0 < resume["step"] < 16  # it really resumed in the middle of the first epoch
    assert resume["step"] >= int(resumed_from.name.rsplit("_", 1)[1])

    reference = run_sslkit("train", str(tiny_recipe), f"train.output_dir={tmp_path}", "train.name=reference",
                           *RESUMABLE, *extra)
    assert reference.returncode == 0, reference.stderr[-3000:]
    _assert_bitwise_equal(_final_weights(tmp_path / "killed"), _final_weights(tmp_path / "reference"))
    # metrics.jsonl holds each step once: what the killed run logged after its checkpoint was dropped
    steps = [m["step"] for m in read_metrics(tmp_path / "killed") if "loss" in m]
    assert steps == sorted(set(steps))
    assert steps == [m["step"] for m in read_metrics(tmp_path / "reference") if "loss" in m]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_recipe, tmp_path):
    run = _start(tiny_recipe, tmp_path, "run", "train.epochs=20")
    _wait_for_checkpoint(tmp_path / "run", run)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    assert "SIGTERM" in out
    stopped = next(m for m in read_metrics(tmp_path / "run") if m.get("event") == "sigterm")
    last = (tmp_path / "run" / "checkpoints" / "last").resolve()
    assert last.name.endswith(f"_step_{stopped['step']:08d}")  # saved at the step it stopped
    assert stopped["step"] < 20 * 16
    assert not (tmp_path / "run" / "backbone.safetensors").exists()  # not finished, so not exported
    resumed = load_config(tmp_path / "run" / "config.yaml", ["resume=true", "train.max_steps=" + str(stopped["step"] + 2)])
    assert train(resumed)["loss"] > 0  # it continues from there


def _nan_at(monkeypatch, steps):
    """SimCLR whose loss is NaN at the given optimiser steps (one ssl_step per step, from 0)."""
    ssl_step = SimCLR.ssl_step
    calls = itertools.count()

    def poisoned(self, views):
        terms, features = ssl_step(self, views)
        factor = math.nan if next(calls) in steps else 1.0
        return {name: term * factor for name, term in terms.items()}, features

    monkeypatch.setattr(SimCLR, "ssl_step", poisoned)


def _config(tiny_recipe, tmp_path, *extra):
    return load_config(tiny_recipe, [f"train.output_dir={tmp_path}", "train.name=run", "eval.knn=false",
                                      "train.log_every_steps=1", *extra])


def test_a_nonfinite_step_is_skipped_and_counted(tiny_recipe, tmp_path, monkeypatch):
    _nan_at(monkeypatch, {2, 3})
    with pytest.warns(RuntimeWarning, match="non-finite"):
        train(_config(tiny_recipe, tmp_path, "train.max_steps=6"))
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics if m.get("event") == "nonfinite_step"] == [3, 4]
    assert [m["nonfinite_steps"] for m in metrics if m.get("event") == "nonfinite_step"] == [1, 2]
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m and m["step"] not in (3, 4))
    weights = _final_weights(tmp_path / "run")
    assert all(torch.isfinite(w).all() for w in weights.values())  # the NaN steps were not applied


def test_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tiny_recipe, tmp_path, monkeypatch):
    _nan_at(monkeypatch, set(range(5, 100)))
    cfg = _config(tiny_recipe, tmp_path, "train.checkpoint_every_steps=4", "train.max_nonfinite_steps=3")
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteError, match="learning rate") as stopped:
        train(cfg)
    last = (tmp_path / "run" / "checkpoints" / "last").resolve()
    assert last.name == "epoch_0000_step_00000004"  # nothing saved after the first bad step
    assert str(last) in str(stopped.value)
    assert all(torch.isfinite(w).all() for w in _final_weights(tmp_path / "run").values())
