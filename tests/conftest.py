import contextlib
import io
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

# A recipe small enough for a test: synthetic data, a tiny CNN, 16 px views.
TINY_RECIPE = {
    "data": {"name": "synthetic"},
    "model": {"backbone": "tiny_cnn", "width": 8},
    "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_output_dim": 16, "temperature": 0.5},
    "augment": {"size": 16},
    "optim": {"name": "sgd", "lr": 0.1, "lr_batch_size": None},
    "train": {"epochs": 2, "batch_size": 64, "log_every_steps": 2, "progress": False},
    "eval": {"batch_size": 256},
}


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_RECIPE))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained for one epoch (once per test module): its directory, with
    checkpoints/last and backbone.safetensors, for the evaluation commands."""
    folder = tmp_path_factory.mktemp("run")
    recipe = folder / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_RECIPE, "train": {**TINY_RECIPE["train"], "epochs": 1}}))
    done = run_sslkit_here("train", str(recipe), f"train.output_dir={folder}", "train.name=t", "eval.knn=false")
    assert done.returncode == 0, done.stderr
    return folder / "t"


@pytest.fixture
def no_default_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide the machine's data folders and $SSLKIT_DATA so a test sees only its own files."""
    from sslkit.data import datasets

    monkeypatch.setattr(datasets, "SYSTEM_DATA_DIR", tmp_path / "system")
    monkeypatch.setattr(datasets, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.delenv("SSLKIT_DATA", raising=False)


def run_sslkit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m sslkit ARGS`` in a fresh process, as a user runs it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sslkit", *args], capture_output=True, text=True,
                          env=full_env, timeout=600)


def run_sslkit_here(*args: str) -> subprocess.CompletedProcess:
    """``sslkit ARGS`` in this process: the entry point's code (``sslkit.cli.main``) without a
    new Python that imports torch and sslkit again (~11 s on 2 cores); the exit status, stdout
    and stderr as ``run_sslkit`` gives them."""
    from sslkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(args))
        except SystemExit as exit:  # argparse's errors
            status = exit.code
    return subprocess.CompletedProcess(["sslkit", *args], status, out.getvalue(), err.getvalue())


def set_step(method, step: int, steps_per_epoch: int, total_steps: int) -> None:
    """Give ``method`` its schedules' values at ``step``, as the engine does before that step."""
    from sslkit.schedules import at_step

    method.scheduled = at_step(method.schedules(steps_per_epoch, total_steps), step)


_WORKER: dict[str, Any] = {}  # in a worker of run_gloo_workers: its store, rank and world size


def _gloo_worker(rank: int, port: int, world: int, work: Callable[[int], Any], out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    _WORKER.update(store=store, rank=rank, world=world)
    regroup("first")
    try:
        assert dist.get_world_size() == world  # really `world` processes
        torch.save(work(rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def regroup(tag: str) -> None:
    """In a worker of ``run_gloo_workers``: join the workers' process group again if code under
    test destroyed it (accelerate's ``end_training`` does); ``tag`` names the new group's keys in
    the shared store, the same on every worker and new for each group."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.PrefixStore(tag, _WORKER["store"]), rank=_WORKER["rank"],
                                world_size=_WORKER["world"], timeout=timedelta(seconds=60))


def train_as_launched(cfg: Any) -> Any:
    """In a worker of ``run_gloo_workers``: ``sslkit.engine.train(cfg)`` as one of the processes a
    launcher starts (the environment a launcher sets; the process group rejoined after a previous
    run's ``end_training`` destroyed it; the trainer forgets the forked parent's accelerate state)."""
    from sslkit.engine import train

    rank, world = _WORKER["rank"], _WORKER["world"]
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    _WORKER["runs"] = _WORKER.get("runs", 0) + 1
    regroup(f"run{_WORKER['runs']}")
    return train(cfg)


def run_gloo_workers(work: Callable[[int], Any], out_dir: Path, world: int = 2) -> list:
    """``work(rank)`` in ``world`` CPU processes joined by a gloo process group; what each
    returned (tensors, dicts of them), in rank order. ``work`` must be a module-level function."""
    # port 0: the OS picks a free port, and the store in this process holds it for the workers
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    # fork: the workers inherit the imports (spawn re-imports torch and sslkit: ~20 s on a busy
    # 2-core CI machine); they set 1 thread before any op. A forked child cannot use CUDA once
    # this process has, so spawn then.
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    ctx = mp.start_processes(_gloo_worker, args=(store.port, world, work, str(out_dir)), nprocs=world, join=False,
                             start_method=method)
    deadline = time.monotonic() + 600
    try:
        while not ctx.join(timeout=1):  # raises with the worker's traceback if one fails
            assert time.monotonic() < deadline, "workers timed out"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
