"""Checkpoints written so that a crash never leaves a half-written 'last'.

Layout of ``<run>/checkpoints/``: one directory per save (``epoch_0003``), each the output of
``accelerator.save_state`` (``model.safetensors``, optimiser, scaler, per-process RNG, the
trainer state (step and augmentation RNG)) plus the run's ``config.yaml``; and ``last``, a
symlink to the newest. A save goes to a hidden temporary directory first and is renamed into
place; ``last`` is swapped with an atomic ``os.replace``. What a save cut short leaves behind
(a process killed in the middle) is deleted when the run resumes (``remove_unfinished``).

The last file written before the rename is ``manifest.json``: every other file's path, size and
sha256 (about 0.2 s for a ResNet-50's 190 MB of weights and SGD state on one CPU core with SHA
instructions). Loading verifies a checkpoint against it (``verify_checkpoint``), so a file cut
short or changed since (an interrupted copy, a disk error) is reported by name instead of failing
deep inside a loader; ``find_resumable`` falls back to the newest intact checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import yaml
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sslkit.config import Config, config_from_dict, load_config, save_config
from sslkit.errors import UserError
from sslkit.methods import Method, create_method
from sslkit.models import create_backbone

LAST = "last"
CONFIG_KEY = "sslkit_config"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "sslkit-checkpoint-manifest/1"
# epoch_0003: the end of epoch 3 (step 3 x steps_per_epoch); epoch_0003_step_00000450: step 450,
# inside the 4th epoch (index 3). So (3, -1) < (3, 450) < (4, -1) orders them by step.
_TAG = re.compile(r"epoch_(\d+)(?:_step_(\d+))?")


class DamagedCheckpointError(UserError):
    """A checkpoint whose files are not the ones it was saved with: missing, cut short or changed."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint skipped on resume, or one saved before manifests that cannot be verified."""


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
        write_manifest(tmp)  # last: a save that stops before it is never renamed into place
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        link = ckpt_root / f".{LAST}.tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(tag)
        os.replace(link, ckpt_root / LAST)
        # The new one is kept even when a damaged one with a later tag is still there (a run
        # resumed from before it).
        older = [p for p in list_checkpoints(ckpt_root) if p != final]
        for old in older[max(keep, 1) - 1:]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def remove_unfinished(ckpt_root: Path) -> None:
    """Delete what a save cut short left (``.tmp_<tag>/``, ``.last.tmp``); the run directory's
    lock must be held, so that no live save is deleted."""
    for tmp in ckpt_root.glob(".tmp_*"):
        shutil.rmtree(tmp)
    (ckpt_root / f".{LAST}.tmp").unlink(missing_ok=True)


def last_checkpoint(ckpt_root: Path) -> Path | None:
    """Where ``last`` points, unverified; None without one."""
    last = ckpt_root / LAST
    return last.resolve() if last.exists() else None


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(ckpt_dir: Path) -> None:
    """``manifest.json``: ``{"format": ..., "files": {relative path: {"size", "sha256"}}}`` of
    every file under ``ckpt_dir``. Called once all of them are written."""
    files = {p.relative_to(ckpt_dir).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (ckpt_dir / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1) + "\n")


def _damaged(ckpt_dir: Path, problem: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"damaged checkpoint {ckpt_dir}: {problem}")


def verify_checkpoint(ckpt_dir: Path) -> None:
    """Raise ``DamagedCheckpointError`` naming the first file that is missing, or whose size or
    sha256 differs from ``manifest.json`` (files added later, e.g. eval results, are ignored).

    A checkpoint without a manifest was saved before sslkit wrote them: the rename makes a
    manifest-less checkpoint of a newer sslkit impossible. Refusing those would strand every run
    started before; instead each is accepted with a ``CheckpointWarning`` once its files pass
    their own checks (``_check_structure``).
    """
    manifest = ckpt_dir / MANIFEST
    if not manifest.is_file():
        _check_structure(ckpt_dir)
        warnings.warn(f"checkpoint {ckpt_dir} has no {MANIFEST} (saved by an older sslkit), so it cannot be "
                      "verified byte for byte; its files open cleanly", CheckpointWarning, stacklevel=2)
        return
    try:
        listed = json.loads(manifest.read_text())["files"]
        files = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in listed.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise _damaged(ckpt_dir, f"{MANIFEST} is unreadable ({type(err).__name__}: {err})") from None
    for name, (size, _) in files.items():  # sizes first: a file cut short is found without hashing
        path = ckpt_dir / name
        if not path.is_file():
            raise _damaged(ckpt_dir, f"{name} is missing")
        if path.stat().st_size != size:
            raise _damaged(ckpt_dir, f"{name} is {path.stat().st_size} bytes, but {size} were saved")
    for name, (_, digest) in files.items():
        if _sha256(ckpt_dir / name) != digest:
            raise _damaged(ckpt_dir, f"{name} is not the file that was saved (its sha256 differs from {MANIFEST})")


def _check_structure(ckpt_dir: Path) -> None:
    """What a checkpoint without a manifest can be checked for: its model and config are there,
    the safetensors header covers the whole file (a file cut short fails), and every torch.save
    archive (optimiser, RNG, trainer state) passes the CRC-32 of each member."""
    for name in ("model.safetensors", "config.yaml"):
        if not (ckpt_dir / name).is_file():
            raise _damaged(ckpt_dir, f"{name} is missing")
    for path in sorted(ckpt_dir.rglob("*")):
        name = path.relative_to(ckpt_dir).as_posix()
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), "pt"):
                    pass
            except SafetensorError as err:
                raise _damaged(ckpt_dir, f"{name} is unreadable ({err})") from None
        elif path.suffix in (".bin", ".pkl"):  # torch.save archives (Accelerate's names)
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise _damaged(ckpt_dir, f"{name} is unreadable ({err})") from None
            if bad is not None:
                raise _damaged(ckpt_dir, f"{name} is corrupt (member {bad} fails its CRC check)")


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """The checkpoint directories in ``ckpt_root``, newest (highest step) first."""
    found = []
    for path in ckpt_root.glob("epoch_*"):
        match = _TAG.fullmatch(path.name)
        if match and path.is_dir():
            found.append(((int(match[1]), -1 if match[2] is None else int(match[2])), path))
    return [path for _, path in sorted(found, reverse=True)]


def find_resumable(ckpt_root: Path) -> Path:
    """The newest intact checkpoint: ``last`` first, then the others newest first.

    Each damaged one tried is named in a ``CheckpointWarning`` saying what is wrong with it.
    Raises ``UserError`` (one line) when there is no checkpoint or none is intact. Every process
    calls it: reading the same files, all pick the same checkpoint without communicating.
    """
    last = ckpt_root / LAST
    candidates = [last.resolve()] if last.exists() else []
    if last.is_symlink() and not candidates:
        warnings.warn(f"{last} points to {os.readlink(last)}, which does not exist; trying the other checkpoints",
                      CheckpointWarning, stacklevel=2)
    candidates += [p for p in list_checkpoints(ckpt_root) if p.resolve() not in candidates]
    for ckpt in candidates:
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except DamagedCheckpointError as err:
            warnings.warn(f"{err}; skipped, trying an older checkpoint", CheckpointWarning, stacklevel=2)
    if not candidates:
        raise UserError(f"no checkpoint in {ckpt_root}: nothing to resume. Drop resume=true to start a new run.")
    raise UserError(
        f"no checkpoint in {ckpt_root} is intact ({', '.join(p.name for p in candidates)}; each is named in a "
        "warning above with what is wrong): start the run afresh with overwrite=true (or a new train.name), or "
        "restore the damaged files from a copy"
    )


def export_backbone(method: Method, cfg: Config, path: Path) -> None:
    """The feature network as plain safetensors; the run's config rides in the metadata."""
    state = {k: v.detach().contiguous() for k, v in method.feature_model().state_dict().items()}
    save_file(state, str(path), metadata={CONFIG_KEY: yaml.safe_dump(cfg.to_dict())})


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` is a checkpoint directory (a backbone file is not)."""
    return path.is_dir() and any((path / name).is_file() for name in ("model.safetensors", MANIFEST))


def load_method(ckpt_dir: Path) -> tuple[Config, Method]:
    """The whole method (heads, teacher) of a checkpoint directory, verified first."""
    try:
        verify_checkpoint(ckpt_dir.resolve())  # named as the directory 'last' points to
    except DamagedCheckpointError as err:
        raise DamagedCheckpointError(
            f"{err}. Evaluate another checkpoint of the run (its checkpoints/ folder keeps the previous ones) "
            "or its backbone.safetensors") from None
    cfg = load_config(ckpt_dir / "config.yaml")
    state = load_file(str(ckpt_dir / "model.safetensors"))
    probe = state.get("online_probe.weight")  # (C, D) when the run trained an online probe
    method = create_method(cfg, None if probe is None else probe.shape[0])
    method.load_state_dict(state)
    return cfg, method


def load_feature_projection(path: str | Path) -> Optional[nn.Module]:
    """The projection head after the feature network of a checkpoint directory; None for an
    exported backbone file (it holds the feature network only) or a method without a head."""
    path = Path(path)
    return load_method(path)[1].feature_projection() if is_checkpoint_dir(path) else None


def load_feature_model(path: str | Path) -> tuple[Config, nn.Module]:
    """The k-NN feature network of a checkpoint directory or an exported backbone file."""
    path = Path(path)
    if is_checkpoint_dir(path):
        cfg, method = load_method(path)
        return cfg, method.feature_model()
    if path.is_file() and path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except SafetensorError as err:
            raise UserError(f"{path} is damaged or not a safetensors file ({err}); evaluate its run's "
                            "checkpoints/last instead") from None
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
