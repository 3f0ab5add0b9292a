"""Optimisers by name, each with its own config keys, and the learning-rate and weight-decay
schedules (warm-up + cosine, per step).

All three optimisers step without host-device synchronisation and can skip a step on the device
(``found_inf``, see ``step_unless_found_inf``): ``sgd`` and ``adamw`` are torch's fused kernels,
``lars`` is sslkit's foreach LARS.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from sslkit.config import OptimConfig, Positive
from sslkit.engine.lars import LARS
from sslkit.registry import Registry
from sslkit.schedules import Schedules, cosine, tabulate

OPTIMIZERS: Registry[Callable[[list[dict], Any, float], torch.optim.Optimizer]] = Registry("optimizer", OptimConfig)



class SGDConfig(OptimConfig):
    name: str = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)


class LARSConfig(SGDConfig):
    """LARS (You et al. 2017) as SimCLR, Barlow Twins and VICReg use it."""

    name: str = "lars"
    lars_trust_coefficient: Positive = 0.001


Beta = Annotated[float, Field(ge=0, lt=1)]


class AdamWConfig(OptimConfig):
    name: str = "adamw"
    betas: tuple[Beta, Beta] = (0.9, 0.999)


@OPTIMIZERS.register("sgd", config=SGDConfig)
def _sgd(groups: list[dict], cfg: SGDConfig, lr: float) -> torch.optim.Optimizer:
    sgd = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, fused=True)
    sgd.register_step_pre_hook(_zero_momentum_buffers)
    return sgd


def _zero_momentum_buffers(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Step pre-hook: a zero momentum buffer for each parameter about to be stepped that has none.

    Fused SGD starts its buffers as ``torch.empty_like(grad)`` and fills them in its first
    step's kernel; when that step is skipped (``found_inf``) they stay uninitialised and the next
    step uses them (torch 2.14, CPU and CUDA kernels alike: nan or ~1e9 in the weights). A zero
    buffer gives the same first step, ``buf = momentum * 0 + g`` (dampening is 0; nesterov's
    ``g + momentum * buf`` follows). Created at the step rather than at construction, so it
    lands on the device the parameter is on by then, also after ``load_state_dict``.
    """
    for group in optimizer.param_groups:
        if group["momentum"] != 0:
            for p in group["params"]:
                if p.grad is not None and "momentum_buffer" not in optimizer.state[p]:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)  # as fused: grad's layout


@OPTIMIZERS.register("lars", config=LARSConfig)
def _lars(groups: list[dict], cfg: LARSConfig, lr: float) -> torch.optim.Optimizer:
    # Groups with weight_decay=0 (biases, norms) are left unscaled, as in SimCLR and lightly's LARS.
    return LARS(groups, lr=lr, momentum=cfg.momentum, trust_coefficient=cfg.lars_trust_coefficient)


@OPTIMIZERS.register("adamw", config=AdamWConfig)
def _adamw(groups: list[dict], cfg: AdamWConfig, lr: float) -> torch.optim.Optimizer:
    # A skipped first step leaves its state alone (step 0, zero moments), unlike fused SGD's.
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, fused=True)


def _unwrapped(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimiser, also inside accelerate's ``AcceleratedOptimizer`` (``.optimizer``)."""
    return getattr(optimizer, "optimizer", optimizer)


def supports_found_inf(optimizer: Any) -> bool:
    """Whether ``optimizer`` (or the one accelerate wraps) skips a step on the device when its
    ``found_inf`` is set, as torch's fused optimisers and sslkit's LARS do."""
    return bool(getattr(_unwrapped(optimizer), "_step_supports_amp_scaling", False))


def step_unless_found_inf(optimizer: Any, found_inf: Tensor) -> None:
    """``optimizer.step()``, which changes nothing when ``found_inf`` (0-d float tensor on the
    parameters' device, 0 or 1) is 1: decided on the device, no host read.

    Sets ``found_inf`` on the underlying optimiser for the step and removes it afterwards, as
    ``torch.amp.GradScaler.step`` does (a GradScaler inside accelerate's optimiser, fp16, sets
    its own ``found_inf`` instead). ``grad_scale`` is left alone.
    """
    inner = _unwrapped(optimizer)
    if not supports_found_inf(inner):
        raise TypeError(f"{type(inner).__name__} cannot skip a step on the device (no _step_supports_amp_scaling)")
    inner.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        if hasattr(inner, "found_inf"):  # a GradScaler stepping it has deleted it already
            del inner.found_inf


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
    own ``lr`` and ``weight_decay``) take their parameters out of the default groups.

    Each group records how it follows the schedules (``set_schedules``): ``lr_scale``, its
    learning rate over the peak, and ``wd_scale``, its weight decay over ``optim.weight_decay``.
    """
    skip = frozenset(id(p) for group in extra_groups for p in group["params"])
    groups = param_groups(model, cfg.weight_decay, cfg.exclude_bias_norm, skip) + [dict(g) for g in extra_groups]
    peak = scaled_lr(cfg, batch_size)
    for group in groups:
        group["lr_scale"] = group.get("lr", peak) / peak
        group["wd_scale"] = group["weight_decay"] / cfg.weight_decay if cfg.weight_decay else 0.0
    return OPTIMIZERS.get(cfg.name)(groups, cfg, peak)


def optim_schedules(cfg: OptimConfig, batch_size: int, steps_per_epoch: int, total_steps: int) -> Schedules:
    """``lr``: linear warm-up to the (batch-scaled) peak over ``warmup_epochs``, then a cosine
    down to ``peak * min_lr_ratio``; ``weight_decay``: a cosine from ``weight_decay`` to
    ``weight_decay_end`` (DINO's), constant when that is None."""
    peak, warmup = scaled_lr(cfg, batch_size), round(cfg.warmup_epochs * steps_per_epoch)
    wd_end = cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end
    return {
        "lr": tabulate(lambda s: cosine(s, total_steps, peak, peak * cfg.min_lr_ratio, warmup), total_steps),
        "weight_decay": tabulate(lambda s: cosine(s, total_steps, cfg.weight_decay, wd_end), total_steps),
    }


def set_schedules(optimizer: torch.optim.Optimizer, values: dict[str, float]) -> None:
    """This step's ``lr`` and ``weight_decay`` into every group, by its ``lr_scale`` and ``wd_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = values["lr"] * group["lr_scale"]
        group["weight_decay"] = values["weight_decay"] * group["wd_scale"]
