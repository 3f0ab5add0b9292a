"""Per-step schedules, computed once before training as DINO's ``main_dino.py`` does: one value
per optimiser step for each scheduled quantity (learning rate, weight decay, EMA momentum,
teacher temperature, last-layer freezing, ...). The engine reads step ``s``'s values before that
step, hands them to the optimiser and the method, and logs them by name.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

Schedules = dict[str, np.ndarray]  # name -> (total_steps,) float64


def cosine(step: float, total_steps: int, start: float, end: float, warmup_steps: int = 0) -> float:
    """A linear warm-up from ~0 to ``start`` over ``warmup_steps`` (``start * (step + 1) /
    warmup_steps``), then a half cosine from ``start`` to ``end`` over the remaining steps,
    ``end`` from then on (the schedules of SimCLR's and DINO's learning rate, DINO's weight decay,
    BYOL's momentum)."""
    if step < warmup_steps:
        return start * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def tabulate(value: Callable[[int], float], total_steps: int) -> np.ndarray:
    """``value(step)`` for every step: (total_steps,) float64."""
    return np.fromiter((value(step) for step in range(total_steps)), dtype=np.float64, count=total_steps)


def at_step(schedules: Schedules, step: int) -> dict[str, float]:
    """Every schedule's value for ``step`` (the last one past the end)."""
    return {name: float(values[min(step, len(values) - 1)]) for name, values in schedules.items()}
