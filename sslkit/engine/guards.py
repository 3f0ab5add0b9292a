"""What stops a run early: non-finite steps, SIGTERM (a cluster about to pre-empt the job), and
the death of the launcher that started the process."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Callable, Iterable, Iterator, Optional

import torch

from sslkit.engine.checkpoint import last_checkpoint
from sslkit.errors import UserError


class NonFiniteError(UserError):
    """Too many optimiser steps in a row had a NaN or Inf loss or gradient (the settings, not
    the code, are to blame: the message names likely causes and the checkpoint to resume from)."""


def nonfinite_gradients(parameters: Iterable[torch.nn.Parameter], norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A 0-d float tensor on the device: 1 when a gradient holds a NaN or Inf, else 0; no host read.

    ``norm``: the total gradient norm when already computed (gradient clipping returns it).
    Gradients are synchronised across processes, so every process gets the same flag.
    """
    if norm is None:
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            raise ValueError("no parameter has a gradient: nothing to check or to optimise")
        norm = torch.nn.utils.get_total_norm(grads)
    return (~torch.isfinite(norm)).float()


class NonFiniteGuard:
    """Counts skipped steps; ``max_in_a_row`` consecutive ones raise ``NonFiniteError`` (0: never).

    The loop ``record``s each step's skip flag, a device tensor, and ``check``s them in one host
    read when it reads anyway (logging) and before anything is saved, so a bad step costs no
    extra synchronisation and no checkpoint is written after the first bad step of a failing run.
    """

    def __init__(self, max_in_a_row: int, precision: str, ckpt_root: Path) -> None:
        self.max_in_a_row = max_in_a_row
        self.precision = precision
        self.ckpt_root = ckpt_root
        self.total = 0  # skipped steps in this process's run
        self.in_a_row = 0
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, 0-d skip flag) not read yet

    def record(self, step: int, skipped: torch.Tensor) -> None:
        """Step ``step``'s flag (1: skipped), kept on the device until ``check``."""
        self._pending.append((step, skipped))

    def check(self, on_skip: Callable[[int, int], None]) -> None:
        """Read the recorded flags; calls ``on_skip(step, total)`` for each skipped step, in order."""
        if not self._pending:
            return
        steps = [step for step, _ in self._pending]
        flags = torch.stack([flag for _, flag in self._pending]).tolist()
        self._pending = []
        for step, flag in zip(steps, flags):
            if flag:
                on_skip(step, self.total + 1)
            self._update(bool(flag), step)

    def _update(self, skipped: bool, step: int) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        warnings.warn(f"step {step}: non-finite loss or gradient, step skipped "
                      f"({self.in_a_row} in a row, {self.total} in all)", RuntimeWarning, stacklevel=3)
        if self.in_a_row >= self.max_in_a_row > 0:
            causes = ["a learning rate too high for this batch size (lower optim.lr or raise optim.warmup_epochs)",
                      "exploding gradients (set optim.clip_grad_norm, e.g. 3.0)"]
            if self.precision == "fp16":
                causes.insert(0, "fp16 overflow (use train.precision=bf16 where the hardware has it)")
            good = last_checkpoint(self.ckpt_root)
            kept = (f"the last good checkpoint is {good}; fix the settings and resume with resume=true"
                    if good else "no checkpoint had been written yet")
            raise NonFiniteError(
                f"stopped at step {step}: {self.in_a_row} steps in a row had a NaN or Inf loss or gradient. "
                f"Likely causes: {'; '.join(causes)}. Nothing was saved after the first bad step: {kept}."
            )


@contextmanager
def sigterm_flag() -> Iterator[Callable[[], bool]]:
    """While active, SIGTERM sets a flag instead of killing the process; yields a function that
    reads the flag. The loop then saves a checkpoint at the end of the step and returns."""
    received = False

    def handler(signum: int, frame: Optional[FrameType]) -> None:
        nonlocal received
        received = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a notebook worker): leave SIGTERM alone
        yield lambda: False
        return
    try:
        yield lambda: received
    finally:
        signal.signal(signal.SIGTERM, previous)


# Set in the processes a launcher starts: torch elastic's workers (torchrun, and accelerate
# launch with several processes, which runs torch elastic's agent); accelerate launch's child
# when it starts one process.
LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "ACCELERATE_DYNAMO_BACKEND")
ORPHAN_EXIT_STATUS = 1


@contextmanager
def exit_with_launcher(interval: float = 0.5) -> Iterator[None]:
    """While active, a process started by a launcher (``LAUNCHER_ENV``) ends itself within
    ``interval`` seconds of its launcher's death, saving nothing.

    torch elastic starts each worker in a session of its own, so a launcher killed hard (SIGKILL:
    an out-of-memory killer, a scheduler) takes no worker with it, and they would train on, and
    write the run directory, beside the next run. A daemon thread compares ``os.getppid()`` with
    the parent at entry: once re-parented, the process calls ``os._exit`` from that thread, also
    while the main thread waits in a collective for a peer that is gone. A checkpoint being saved
    then stays a hidden temporary directory; ``last`` still names the previous, complete one.
    No per-step cost: one system call per ``interval``, off the training thread.

    Polling rather than Linux's ``PR_SET_PDEATHSIG``, which fires when the parent *thread* that
    started the process exits (a launcher may start workers from any thread), and exists on
    Linux only. A process without a launcher (``sslkit train`` from a shell, ``nohup``, a
    notebook) is not watched: it outlives its shell when asked to.
    """
    if not any(name in os.environ for name in LAUNCHER_ENV):
        yield
        return
    launcher = os.getppid()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(interval):
            if os.getppid() != launcher:
                try:
                    print(f"sslkit: the launcher (process {launcher}) is gone: stopping without saving; "
                          "resume=true continues from the last checkpoint", file=sys.stderr, flush=True)
                except OSError:  # nobody reads stderr any more
                    pass
                os._exit(ORPHAN_EXIT_STATUS)

    thread = threading.Thread(target=watch, name="sslkit-launcher-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def parent_death_signal(signum: int) -> Optional[Callable[[], None]]:
    """On Linux, a ``preexec_fn`` for ``subprocess`` that has the kernel send the child ``signum``
    when the thread that started it exits (``PR_SET_PDEATHSIG``); elsewhere None.

    For the launcher the command line starts: it starts it from its main thread, which then
    waits for it, so the thread caveat of PR_SET_PDEATHSIG does not apply. libc is looked up
    here, not between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def set_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call: nothing will send it
            os.kill(os.getpid(), signum)

    return set_signal
