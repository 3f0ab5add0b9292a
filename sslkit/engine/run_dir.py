"""The run directory: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``backbone.safetensors``,
and ``.lock``, held by the main process of the run that writes it."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from sslkit.config import Config, save_config
from sslkit.engine.checkpoint import LAST, list_checkpoints, remove_unfinished
from sslkit.errors import UserError

LOCK = ".lock"
# flock's errors on file systems without locks (Lustre without -o flock, some NFS setups).
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)

# Keys that must match between a checkpoint and the config that resumes or evaluates it.
IDENTITY_KEYS = (
    "method.name", "model.backbone", "model.small_stem", "model.width", "model.norm", "model.timm_kwargs",
    "eval.online_probe",
)


def run_path(cfg: Config) -> Path:
    """The run directory of ``cfg``: ``train.output_dir/train.name``."""
    return Path(cfg.train.output_dir) / (cfg.train.name or "run")


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def check_same_model(ckpt_dir: Path, cfg: Config) -> None:
    """Refuse a checkpoint of another method or backbone with a message, not a shape error."""
    saved = yaml.safe_load((ckpt_dir / "config.yaml").read_text())
    mine = cfg.to_dict()
    diffs = [f"{k}: checkpoint {_get(saved, k)!r}, config {_get(mine, k)!r}"
             for k in IDENTITY_KEYS if _get(saved, k) != _get(mine, k)]
    if diffs:
        raise UserError(
            f"checkpoint {ckpt_dir} is from another model ({'; '.join(diffs)}). Resume it with its "
            "own recipe, or start a new run (another train.name)."
        )


def _busy(run_dir: Path, holder: str) -> UserError:
    """The refusal; ``holder``: the lock file's ``pid on host``, empty while its holder starts."""
    who = f"process {holder}" if holder else "a process that is starting"
    return UserError(
        f"{run_dir} is in use by another training run ({who}): wait for it to end or stop it, "
        "or pass train.name=<new name> for a new run."
    )


@contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` (created with the directory if missing), or raise ``UserError``
    naming the process that holds it.

    An OS file lock (``flock``): the kernel drops it when the process ends, however it ends
    (SIGKILL included), so a lock is never stale; the file stays, holding the last holder's
    ``pid on host`` for the message. On a file system without locks it warns and goes on unlocked.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)  # not truncated: the holder's line
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(run_dir, os.pread(fd, 256, 0).decode(errors="replace").strip()) from None
        except OSError as err:
            if err.errno not in _NO_LOCKS:
                raise
            warnings.warn(f"{run_dir}: this file system has no file locks ({err.strerror}), so nothing stops "
                          "a second run from writing this directory at the same time", RuntimeWarning, stacklevel=3)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file is kept (deleting it would race with the next run's open)


def check_run_dir_free(run_dir: Path) -> None:
    """Raise ``UserError`` if a live run holds ``run_dir``'s lock; creates nothing.

    A quick check before launching processes (the command line's ``--num-processes``); the
    run's main process still takes the lock itself.
    """
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: two checks do not refuse each other
    except BlockingIOError:
        raise _busy(run_dir, os.pread(fd, 256, 0).decode(errors="replace").strip()) from None
    except OSError as err:
        if err.errno not in _NO_LOCKS:
            raise
    finally:
        os.close(fd)


def prepare_run_dir(run_dir: Path, cfg: Config) -> None:
    """Refuse to mix two runs in one directory unless asked to resume or overwrite.

    Call it holding the directory's lock (``lock_run_dir``): it deletes what a run killed in
    the middle of a save left, and ``overwrite`` deletes everything but the lock.
    """
    holds_run = (run_dir / "config.yaml").exists()
    if cfg.resume:
        ckpt_root = run_dir / "checkpoints"
        # Without a usable 'last', an older checkpoint still counts: find_resumable picks one.
        if not ((ckpt_root / LAST).exists() or list_checkpoints(ckpt_root)):
            raise UserError(
                f"resume=true but {run_dir}/checkpoints/last does not exist: nothing to resume. "
                "Drop resume=true to start a new run."
            )
        remove_unfinished(run_dir / "checkpoints")
    elif holds_run and cfg.overwrite:
        for entry in run_dir.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    elif holds_run:
        raise UserError(
            f"{run_dir} already holds a run. Pass resume=true to continue it, overwrite=true to "
            "replace it, or train.name=<new name> for a new run."
        )
    run_dir.mkdir(parents=True, exist_ok=True)


@contextmanager
def open_run_dir(accelerator: Accelerator, run_dir: Path, cfg: Config) -> Iterator[None]:
    """The main process locks ``run_dir`` (``lock_run_dir``), checks it (``prepare_run_dir``) and
    writes ``config.yaml``; the lock is held until the context exits.

    Every process learns whether that failed, and raises: the others would otherwise wait at
    the next barrier for a main process that has stopped. Costs one broadcast, where a barrier was.
    """
    with ExitStack() as held:
        failure: Optional[BaseException] = None
        if accelerator.is_main_process:
            try:
                held.enter_context(lock_run_dir(run_dir))
                prepare_run_dir(run_dir, cfg)
                save_config(cfg, run_dir / "config.yaml")
            except Exception as err:  # re-raised below, after telling the other processes
                failure = err
        outcome = broadcast_object_list([None if failure is None else str(failure)])[0]
        if failure is not None:
            raise failure
        if outcome is not None:
            raise UserError(f"the main process stopped: {outcome}")
        yield


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl`` (main process only), and passes
    the numbers on to the Accelerate trackers of ``accelerator`` (TensorBoard, W&B, ...) if given."""

    def __init__(self, path: Path, enabled: bool, accelerator: Optional[Accelerator] = None) -> None:
        self.path = path
        self.enabled = enabled
        self.accelerator = accelerator
        self.start = time.time()

    def rewind(self, step: int) -> None:
        """Drop the events after ``step``: a resumed run logs them again from its checkpoint."""
        if self.enabled and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)

    def write(self, **event: Any) -> None:
        if self.enabled:
            event["time"] = round(time.time() - self.start, 3)
            with self.path.open("a") as f:
                f.write(json.dumps(event) + "\n")
        if self.accelerator is not None:  # (it logs on the main process only)
            numbers = {k: v for k, v in event.items() if k not in ("step", "epoch", "time")
                       and isinstance(v, (int, float)) and not isinstance(v, bool)}
            if numbers:
                self.accelerator.log(numbers, step=event["step"])


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
