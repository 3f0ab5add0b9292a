"""Checkpoints written so that a crash never leaves a half-written 'last'.

Layout of ``<run>/checkpoints/``: one directory per save (``epoch_0003``), each the output of
``accelerator.save_state`` (``model.safetensors``, optimiser, scaler, per-process RNG, the
registered scheduler and trainer state) plus the run's ``config.yaml``; and ``last``, a
symlink to the newest. A save goes to a hidden temporary directory first and is renamed into
place; ``last`` is swapped with an atomic ``os.replace``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sslkit.errors import UserError
from sslkit.config import Config, config_from_dict, load_config, save_config
from sslkit.methods import Method, create_method
from sslkit.models import create_backbone

LAST = "last"
CONFIG_KEY = "sslkit_config"


def save_checkpoint(accelerator: Accelerator, cfg: Config, ckpt_root: Path, tag: str, keep: int) -> Path:
    """Every process must call this (each saves its RNG state). Returns the new directory."""
    final = ckpt_root / tag
    tmp = ckpt_root / f".tmp_{tag}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_config(cfg, tmp / "config.yaml")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        link = ckpt_root / f".{LAST}.tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(tag)
        os.replace(link, ckpt_root / LAST)
        for old in sorted(p for p in ckpt_root.glob("epoch_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def last_checkpoint(ckpt_root: Path) -> Path | None:
    last = ckpt_root / LAST
    return last.resolve() if last.exists() else None


def export_backbone(method: Method, cfg: Config, path: Path) -> None:
    """The feature network as plain safetensors; the run's config rides in the metadata."""
    state = {k: v.detach().contiguous() for k, v in method.feature_model().state_dict().items()}
    save_file(state, str(path), metadata={CONFIG_KEY: yaml.safe_dump(cfg.to_dict())})


def load_feature_model(path: str | Path) -> tuple[Config, nn.Module]:
    """The k-NN feature network of a checkpoint directory or an exported backbone file."""
    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file():
        cfg = load_config(path / "config.yaml")
        state = load_file(str(path / "model.safetensors"))
        probe = state.get("online_probe.weight")  # (C, D) when the run trained an online probe
        method = create_method(cfg, None if probe is None else probe.shape[0])
        method.load_state_dict(state)
        return cfg, method.feature_model()
    if path.is_file() and path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if CONFIG_KEY not in meta:
            raise UserError(f"{path} has no sslkit config in its metadata: it was not exported by sslkit")
        cfg = config_from_dict(yaml.safe_load(meta[CONFIG_KEY]))
        model = create_backbone(cfg.model)
        model.load_state_dict(load_file(str(path)))
        return cfg, model
    raise UserError(
        f"checkpoint '{path}' is neither a checkpoint directory with model.safetensors "
        "(runs/<name>/checkpoints/last) nor an exported backbone file (runs/<name>/backbone.safetensors)"
    )
