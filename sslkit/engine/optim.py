"""Optimisers by name and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from lightly.utils.lars import LARS
from torch import nn

from sslkit.config import OptimConfig
from sslkit.registry import Registry

OPTIMIZERS: Registry[Callable[[list[dict], OptimConfig, float], torch.optim.Optimizer]] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def _sgd(groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


@OPTIMIZERS.register("lars")
def _lars(groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    # lightly's LARS leaves groups with weight_decay=0 (biases, norms) unscaled, as SimCLR does.
    return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.lars_trust_coefficient)


@OPTIMIZERS.register("adamw")
def _adamw(groups: list[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas)


def scaled_lr(cfg: OptimConfig, batch_size: int) -> float:
    """``lr * batch_size / lr_batch_size`` (the linear scaling rule), or ``lr`` unscaled."""
    return cfg.lr if cfg.lr_batch_size is None else cfg.lr * batch_size / cfg.lr_batch_size


def param_groups(
    model: nn.Module, weight_decay: float, exclude_bias_norm: bool, skip: frozenset[int] = frozenset()
) -> list[dict]:
    """Two groups: weights with decay, and biases/norm parameters (1-d) without it.

    Parameters whose ``id`` is in ``skip`` belong to a group of their own elsewhere.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in skip:
            (no_decay if exclude_bias_norm and p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def create_optimizer(
    model: nn.Module, cfg: OptimConfig, batch_size: int, extra_groups: Sequence[dict] = ()
) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``model``; ``extra_groups`` (e.g. the online probe's, with its
    own ``lr`` and ``weight_decay``) take their parameters out of the default groups."""
    skip = frozenset(id(p) for group in extra_groups for p in group["params"])
    groups = param_groups(model, cfg.weight_decay, cfg.exclude_bias_norm, skip) + list(extra_groups)
    return OPTIMIZERS.get(cfg.name)(groups, cfg, scaled_lr(cfg, batch_size))


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at ``step``: linear from ~0 to 1, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def create_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimiser step."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total_steps, cfg.min_lr_ratio)
    )
