"""The Accelerate training loop, optimisers and schedules, checkpoints, the run directory."""

from sslkit.engine.optim import OPTIMIZERS, create_optimizer, optim_schedules
from sslkit.engine.run_dir import read_metrics
from sslkit.engine.trainer import train

__all__ = ["OPTIMIZERS", "create_optimizer", "optim_schedules", "read_metrics", "train"]
