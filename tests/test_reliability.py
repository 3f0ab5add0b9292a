"""Exact resume after SIGKILL, also with another number of processes; a clean stop on SIGTERM;
the non-finite guard; one run per run directory; no training process outliving its launcher."""

import errno
import fcntl
import itertools
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from functools import partial

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from sslkit.cli import launch_command
from sslkit.config import load_config
from sslkit.engine import read_metrics, train
from sslkit.engine.checkpoint import last_checkpoint
from sslkit.engine.guards import LAUNCHER_ENV, NonFiniteError
from sslkit.engine.run_dir import check_run_dir_free, lock_run_dir, prepare_run_dir
from sslkit.engine.trainer import per_process_batch
from sslkit.errors import UserError
from sslkit.methods.simclr import SimCLR
from tests.conftest import TINY_RECIPE, regroup, run_gloo_workers, run_sslkit, run_sslkit_here, train_as_launched
from tests.test_distributed import METHOD_ARGS

# 16 steps per epoch, a mid-epoch checkpoint every 6 steps, no k-NN (it does not touch the
# training state, and costs time).
RESUMABLE = ["data.train_limit=1024", "train.epochs=2", "train.checkpoint_every_steps=6", "eval.knn=false",
             "train.keep_checkpoints=3"]


def _start(tiny_recipe, out, name, *extra, env=None):
    """``sslkit train`` in the background, as a scheduler would start it."""
    args = [sys.executable, "-m", "sslkit", "train", str(tiny_recipe), f"train.output_dir={out}",
            f"train.name={name}", *RESUMABLE, *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


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


@pytest.fixture
def one_thread():
    """One torch thread here, as in a process started with OMP_NUM_THREADS=1: a run continued (or
    repeated) in this process then computes bitwise what the killed process computed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"OMP_NUM_THREADS": "1"}
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "byol", "mocov2"])  # MoCo v2: its queue of keys resumes too
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tiny_recipe, tmp_path, method, one_thread):
    extra = METHOD_ARGS[method]
    killed = _start(tiny_recipe, tmp_path, "killed", *extra, env=one_thread)
    resumed_from = _wait_for_checkpoint(tmp_path / "killed", killed)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    # resumed and the reference in this process (no start-up each), the kill in a real one
    train(load_config(tiny_recipe, [f"train.output_dir={tmp_path}", "train.name=killed", *RESUMABLE, *extra,
                                    "resume=true"]))
    resume = next(m for m in read_metrics(tmp_path / "killed") if m.get("event") == "resume")
    assert 0 < resume["step"] < 16  # it really resumed in the middle of the first epoch
    assert resume["step"] >= int(resumed_from.name.rsplit("_", 1)[1])

    train(load_config(tiny_recipe, [f"train.output_dir={tmp_path}", "train.name=reference", *RESUMABLE, *extra]))
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
    resumed = load_config(tmp_path / "run" / "config.yaml",
                          ["resume=true", "train.max_steps=" + str(stopped["step"] + 2)])
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


# One run per run directory ---------------------------------------------------------------------


def _step_of(checkpoint):
    """The step of a checkpoint of a ``RESUMABLE`` run (16 steps per epoch) from its name."""
    name = checkpoint.name  # epoch_EEEE_step_SSSSSSSS mid-epoch, epoch_EEEE (epochs done) at an epoch's end
    return int(name.rsplit("_", 1)[1]) if "_step_" in name else 16 * int(name.split("_")[1])


def _refusal(stderr):
    """The one ``sslkit: error:`` line of a refused run (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("sslkit: error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def test_a_run_directory_is_locked_by_one_process_at_a_time(tmp_path):
    run_dir = tmp_path / "run"
    check_run_dir_free(run_dir)
    assert not run_dir.exists()  # the check creates nothing
    with lock_run_dir(run_dir):
        holder = f"process {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(UserError, match=f"in use by another training run \\({holder}\\)"):
            with lock_run_dir(run_dir):
                pass
        with pytest.raises(UserError, match=holder):
            check_run_dir_free(run_dir)
    check_run_dir_free(run_dir)  # released on exit
    with lock_run_dir(run_dir):
        pass


def test_a_file_system_without_locks_warns_and_trains_unlocked(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(RuntimeWarning, match="no file locks"), lock_run_dir(tmp_path / "run"):
        pass


def test_overwrite_and_resume_keep_the_lock_and_clear_what_a_killed_save_left(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    with lock_run_dir(run_dir):
        (ckpts / "epoch_0001").mkdir(parents=True)
        (ckpts / "last").symlink_to("epoch_0001")
        (ckpts / ".tmp_epoch_0002").mkdir()  # a save cut short by a kill
        (run_dir / "config.yaml").write_text("{}")
        cfg = load_config(tiny_recipe, [f"train.output_dir={tmp_path}", "train.name=run", "resume=true"])
        prepare_run_dir(run_dir, cfg)
        assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_0001", "last"]
        cfg = load_config(tiny_recipe, [f"train.output_dir={tmp_path}", "train.name=run", "overwrite=true"])
        prepare_run_dir(run_dir, cfg)
        assert [p.name for p in run_dir.iterdir()] == [".lock"]
        with pytest.raises(UserError, match="in use"):  # still held: the file was not replaced
            check_run_dir_free(run_dir)


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_runs_and_allowed_after_it_is_killed(tiny_recipe, tmp_path):
    first = _start(tiny_recipe, tmp_path, "run", "train.epochs=1000")
    run_dir = tmp_path / "run"
    try:
        psutil.Process(first.pid).nice(19)  # leave the CPU to the runs below (2 cores)
        _wait_for_checkpoint(run_dir, first)
        for extra in ([], ["resume=true"]):  # from this process: the lock is the other process's
            second = run_sslkit_here("train", str(tiny_recipe), f"train.output_dir={tmp_path}", "train.name=run",
                                     *RESUMABLE, *extra)
            assert second.returncode == 2
            assert f"{run_dir} is in use by another training run (process {first.pid} on " in _refusal(second.stderr)
        assert first.poll() is None  # the first run went on
    finally:
        first.kill()
        first.wait()
    step = _step_of(last_checkpoint(run_dir / "checkpoints"))
    done = run_sslkit_here("train", str(tiny_recipe), f"train.output_dir={tmp_path}", "train.name=run", *RESUMABLE,
                           "resume=true", f"train.max_steps={step + 2}")  # the killed run's lock is free
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_every_process_stops_when_the_run_directory_is_in_use(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    argv = ["train", str(tiny_recipe), f"train.output_dir={tmp_path}", "train.name=run", *RESUMABLE]
    holder = f"(process {os.getpid()} on "
    with lock_run_dir(run_dir):
        # through --num-processes: refused before anything is launched
        cli = run_sslkit(*argv, "--num-processes", "2")
        assert cli.returncode == 2 and holder in _refusal(cli.stderr)
        # launched directly: the main process is refused, the other stops too instead of waiting for it
        cmd, env = launch_command(2, argv)
        launched = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode != 0
    errors = [line for line in launched.stderr.splitlines() if line.startswith("sslkit: error:")]
    assert len(errors) == 2 and all(holder in line for line in errors), launched.stderr[-3000:]
    assert sum("the main process stopped" in line for line in errors) == 1  # really two processes
    assert [p.name for p in run_dir.iterdir()] == [".lock"]  # nothing written


# No training process outlives its launcher ------------------------------------------------------


def _alive(process):
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_until_gone(processes, timeout):
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in processes if _alive(p)]


WATCHED = """
import sys, time
from sslkit.engine.guards import exit_with_launcher
with exit_with_launcher(0.1):
    open(sys.argv[1], "w").close()
    time.sleep(120)
"""
LAUNCHER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("launcher_env", [*LAUNCHER_ENV, None])
def test_a_launched_process_ends_soon_after_its_launcher(tmp_path, launcher_env):
    """A process with a launcher's environment (torch elastic's, accelerate launch's) ends when
    its launcher is killed; control: one without it (``nohup sslkit train``) outlives its parent."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    if launcher_env:
        env[launcher_env] = "1"
    ready = tmp_path / "ready"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WATCHED, str(ready)], env=env,
                                stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(launcher.stdout.readline()))
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert time.monotonic() < deadline and _alive(child)
            time.sleep(0.1)
        launcher.kill()
        launcher.wait()
        alive = _wait_until_gone([child], timeout=5)
        assert alive == ([] if launcher_env else [child])
    finally:
        if _alive(child):
            child.kill()


def test_the_launcher_dies_with_the_command_line(tmp_path):
    """``parent_death_signal``: the process ``sslkit train --num-processes`` starts is sent
    SIGTERM when that command is killed, even with SIGKILL."""
    script = ("import signal, subprocess, time\n"
              "from sslkit.engine.guards import parent_death_signal\n"
              "child = subprocess.Popen(['sleep', '120'], preexec_fn=parent_death_signal(signal.SIGTERM))\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    parent.kill()
    parent.wait()
    assert _wait_until_gone([child], timeout=5) == []


# the trainer state (step, augmentation RNG) is the one custom checkpoint; the manifest comes last
CHECKPOINT_FILES = {"config.yaml", "model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl",
                    "random_states_0.pkl", "random_states_1.pkl", "manifest.json"}


@pytest.mark.slow
def test_sigkill_of_the_launchers_process_group_leaves_no_training_process(tiny_recipe, tmp_path):
    """What an out-of-memory killer or a scheduler's hard kill does to ``sslkit train --num-processes 2``:
    the workers (each in a session of its own) end within seconds, the last checkpoint is
    complete, and the run directory is free for ``resume=true``."""
    run_dir = tmp_path / "run"
    output = (tmp_path / "output.txt").open("w")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "sslkit", "train", str(tiny_recipe), "--num-processes", "2",
         f"train.output_dir={tmp_path}", "train.name=run", *RESUMABLE, "train.epochs=1000"],
        stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    workers = []
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "last").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "output.txt").read_text()
            time.sleep(0.1)
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                   if "accelerate.commands.launch" not in p.cmdline()]
        assert len(workers) == 2 and all(os.getsid(p.pid) != launcher.pid for p in workers)
        assert next(m for m in read_metrics(run_dir) if m.get("event") == "start")["world_size"] == 2
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    try:
        assert _wait_until_gone(workers, timeout=10) == []
    finally:
        for worker in workers:  # a failing test leaves nothing training
            if _alive(worker):
                worker.kill()
    assert "the launcher (process" in (tmp_path / "output.txt").read_text()

    last = last_checkpoint(run_dir / "checkpoints")
    assert {p.name for p in last.iterdir()} == CHECKPOINT_FILES
    assert load_file(last / "model.safetensors")
    step = _step_of(last)
    done = run_sslkit_here("train", str(tiny_recipe), f"train.output_dir={tmp_path}", "train.name=run", *RESUMABLE,
                           "train.epochs=1000", "resume=true", f"train.max_steps={step + 2}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list((run_dir / "checkpoints").glob(".tmp_*"))  # what a save cut short left is gone


# Resuming with another number of processes ------------------------------------------------------

# 8 steps of a global batch of 32, a checkpoint after step 4, every loss logged; GroupNorm, not
# BatchNorm, whose per-process statistics would rightly differ between 1 and 2 processes. The
# losses vary by ~1e-2 from step to step, and by ~2e-3 when the resumed run does not restore the
# augmentation generator; float rounding between 1 and 2 processes is ~1e-7.
WORLD_CHANGE = ["data.train_limit=256", "train.epochs=1", "train.batch_size=32", "train.checkpoint_every_steps=4",
                "train.log_every_steps=1", "model.norm=group", "method.proj_batch_norm=false", "eval.knn=false"]


def _losses(run_dir, after):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m and m["step"] > after}


def _world_change_run(recipe, out, name, *extra):
    train_as_launched(load_config(recipe, [f"train.output_dir={out}", f"train.name={name}", *WORLD_CHANGE, *extra]))


def _resume_from_step_4(saved_dir, resumed_dir):
    """A run directory that resumes from step 4's checkpoint of ``saved_dir``."""
    shutil.copytree(saved_dir / "checkpoints" / "epoch_0000_step_00000004", resumed_dir / "checkpoints" / "step_4")
    (resumed_dir / "checkpoints" / "last").symlink_to("step_4")
    shutil.copy(saved_dir / "config.yaml", resumed_dir)


def _two_process_runs(recipe, out, rank):
    """In two forked workers: the 2-process run that saves, then the 2-process resume from
    ``one_saved``'s step 4 (made by one process before the fork)."""
    _world_change_run(recipe, out, "two_saved")
    if rank == 0:
        _resume_from_step_4(out / "one_saved", out / "two_resumed")
    regroup("copied")
    torch.distributed.barrier()  # rank 1 reads the copy only once rank 0 has made it
    _world_change_run(recipe, out, "two_resumed", "resume=true")


@pytest.fixture(scope="module")
def world_change(tmp_path_factory):
    """Runs that save with 1 (2) processes and resume from step 4 with 2 (1): the 1-process ones
    in this process, the 2-process ones in forked gloo workers, so no start-up per run."""
    out = tmp_path_factory.mktemp("world_change")
    recipe = out / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    train(load_config(recipe, [f"train.output_dir={out}", "train.name=one_saved", *WORLD_CHANGE]))
    run_gloo_workers(partial(_two_process_runs, recipe, out), out)
    _resume_from_step_4(out / "two_saved", out / "one_resumed")
    train(load_config(recipe, [f"train.output_dir={out}", "train.name=one_resumed", *WORLD_CHANGE, "resume=true"]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("saved, resumed", [(2, 1), (1, 2)])
def test_resuming_with_another_number_of_processes_continues_the_trajectory(world_change, saved, resumed):
    """Steps 5-8 resumed from step 4's checkpoint with ``resumed`` processes equal (up to float
    rounding) those of the run that saved it with ``saved`` processes and went on."""
    words = {1: "one", 2: "two"}
    reference, resumed_dir = world_change / f"{words[saved]}_saved", world_change / f"{words[resumed]}_resumed"
    for run_dir, processes in ((reference, saved), (resumed_dir, resumed)):
        event = next(m for m in read_metrics(run_dir) if m.get("event") in ("start", "resume"))
        assert event["world_size"] == processes  # really that many processes

    expected, got = _losses(reference, 4), _losses(resumed_dir, 4)
    assert list(got) == [5, 6, 7, 8]
    assert got == pytest.approx(expected, rel=1e-4)
    final = {k: _final_weights(d) for k, d in (("reference", reference), ("resumed", resumed_dir))}
    at_4 = load_file(reference / "checkpoints" / "epoch_0000_step_00000004" / "model.safetensors")
    moved = max((final["reference"][k] - at_4[k]).abs().max().item() for k in at_4)
    assert max((final["reference"][k] - final["resumed"][k]).abs().max().item() for k in at_4) < 1e-3 * moved


def test_a_process_count_that_does_not_divide_the_batch_is_refused(tiny_recipe):
    cfg = load_config(tiny_recipe, ["train.batch_size=64", "train.grad_accum_steps=2"])
    assert per_process_batch(cfg.train, 2) == 16
    with pytest.raises(UserError, match="multiple of 6, or a number of processes that divides 32"):
        per_process_batch(cfg.train, 3)
