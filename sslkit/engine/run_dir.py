"""The run directory: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``backbone.safetensors``."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from accelerate import Accelerator

from sslkit.errors import UserError
from sslkit.config import Config
from sslkit.engine.checkpoint import LAST, list_checkpoints

# Keys that must match between a checkpoint and the config that resumes or evaluates it.
IDENTITY_KEYS = (
    "method.name", "model.backbone", "model.small_stem", "model.width", "model.norm", "model.timm_kwargs",
    "eval.online_probe",
)


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


def prepare_run_dir(run_dir: Path, cfg: Config) -> None:
    """Refuse to mix two runs in one directory unless asked to resume or overwrite."""
    holds_run = (run_dir / "config.yaml").exists()
    if cfg.resume:
        ckpt_root = run_dir / "checkpoints"
        # Without a usable 'last', an older checkpoint still counts: find_resumable picks one.
        if not ((ckpt_root / LAST).exists() or list_checkpoints(ckpt_root)):
            raise UserError(
                f"resume=true but {run_dir}/checkpoints/last does not exist: nothing to resume. "
                "Drop resume=true to start a new run."
            )
    elif holds_run and cfg.overwrite:
        shutil.rmtree(run_dir)
    elif holds_run:
        raise UserError(
            f"{run_dir} already holds a run. Pass resume=true to continue it, overwrite=true to "
            "replace it, or train.name=<new name> for a new run."
        )
    run_dir.mkdir(parents=True, exist_ok=True)


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
