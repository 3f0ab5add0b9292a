"""What stops a run early: non-finite steps, and SIGTERM (a cluster about to pre-empt the job)."""

from __future__ import annotations

import signal
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Callable, Iterable, Iterator, Optional

import torch

from sslkit.engine.checkpoint import last_checkpoint


class NonFiniteError(RuntimeError):
    """Too many optimiser steps in a row had a NaN or Inf loss or gradient."""


def grads_finite(loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter]) -> bool:
    """Whether ``loss`` and every gradient are finite: one reduction, one host read."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
    return bool(torch.isfinite(loss + total))


class NonFiniteGuard:
    """Counts skipped steps; ``max_in_a_row`` consecutive ones raise ``NonFiniteError`` (0: never)."""

    def __init__(self, max_in_a_row: int, precision: str, ckpt_root: Path) -> None:
        self.max_in_a_row = max_in_a_row
        self.precision = precision
        self.ckpt_root = ckpt_root
        self.total = 0  # skipped steps in this process's run
        self.in_a_row = 0

    def update(self, skipped: bool, step: int) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        warnings.warn(f"step {step}: non-finite loss or gradient, step skipped "
                      f"({self.in_a_row} in a row, {self.total} in all)", RuntimeWarning, stacklevel=2)
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
