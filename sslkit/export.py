"""``sslkit export``: a run's feature network for timm alone, or as a Hugging Face Hub folder.

    sslkit export runs/dino_vit                  # -> runs/dino_vit/export/timm/
    sslkit export runs/dino_vit --format hf      # -> runs/dino_vit/export/hf/ (push it to a hub)

Both formats hold ``model.safetensors`` (timm's own key names, the model built with
``num_classes=0``) and ``config.json``; neither needs sslkit to load:

* ``timm``: a weight file and the exact ``timm.create_model(..., pretrained=True,
  pretrained_cfg_overlay=dict(file=...), **model_args)`` line (in ``config.json`` under
  ``sslkit.load`` and in ``README.md``).
* ``hf``: the layout timm reads from the Hugging Face Hub (``config.json`` with
  ``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``) and a model card;
  ``timm.create_model("local-dir:<folder>", pretrained=True)`` loads it, and so does
  ``timm.create_model("hf-hub:<user>/<repo>", pretrained=True)`` once it is pushed.

The exported network is the one k-NN evaluates (``Method.feature_model()``: DINO's teacher
backbone, for instance). ``pretrained_cfg`` carries the run's preprocessing (view size, mean
and std, resize without crop), so ``timm.data.resolve_data_config(model=model)`` matches it.
The run's sslkit config rides in the weights' metadata (so ``sslkit eval`` reads an export too)
and, for ``hf``, in the model card, less ``data.root`` and ``train.output_dir`` (local paths).
Every export is loaded back with timm as documented and must compute the same features as
sslkit on a random batch; otherwise its files are removed and the export fails.
Backbones that timm cannot build (sslkit's ``tiny_cnn``, a ResNet with ``model.small_stem``)
are refused with the reason.
"""

from __future__ import annotations

import json
import keyword
from pathlib import Path
from typing import Any, Optional

import timm
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from sslkit.errors import UserError
from sslkit.config import Config
from sslkit.engine.checkpoint import CONFIG_KEY, LAST, load_feature_model
from sslkit.models.backbones import BACKBONES

FORMATS = ("timm", "hf")
FILES = ("model.safetensors", "config.json", "README.md")


def find_checkpoint(run_dir: str | Path, checkpoint: Optional[str | Path] = None) -> Path:
    """``checkpoint`` when given, else the run's ``backbone.safetensors``, else ``checkpoints/last``."""
    if checkpoint is not None:
        return Path(checkpoint)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        hint = " (pass the run directory, or the file with --checkpoint)" if run_dir.is_file() else ""
        raise UserError(f"run directory '{run_dir}' does not exist{hint}")
    backbone = run_dir / "backbone.safetensors"
    if backbone.is_file():
        return backbone
    last = run_dir / "checkpoints" / LAST
    if (last / "model.safetensors").is_file():
        return last.resolve()
    raise UserError(
        f"'{run_dir}' holds neither backbone.safetensors nor checkpoints/last: is it a run directory "
        "(runs/<name>)? Pick a checkpoint with --checkpoint"
    )


def timm_model_args(cfg: Config) -> tuple[str, dict[str, Any]]:
    """(timm architecture, ``create_model`` keyword arguments) that build the run's backbone.

    Raises ValueError for backbones timm alone cannot build the same.
    """
    m = cfg.model
    if m.backbone in BACKBONES:
        raise UserError(
            f"model.backbone '{m.backbone}' is sslkit's own network: timm has no such architecture, so it "
            "cannot be exported for timm. Load the run's backbone.safetensors with sslkit "
            "(sslkit.engine.checkpoint.load_feature_model), or train a timm backbone (e.g. model.backbone=resnet18)"
        )
    if not timm.is_model(m.backbone):
        raise UserError(f"model.backbone '{m.backbone}' is not a timm model in timm {timm.__version__}")
    if m.small_stem:
        raise UserError(
            f"model.small_stem=true replaced {m.backbone}'s stem by a 3x3 stride-1 conv without max-pool; no "
            "timm ResNet configuration builds that stem (its first conv always has stride 2, 7x7 or a 'deep' "
            "3x3 stack, and its stem pool always downsamples by 2), so timm alone would compute different "
            "features. Load the run's backbone.safetensors with sslkit "
            "(sslkit.engine.checkpoint.load_feature_model), or train with model.small_stem=false to export"
        )
    args = {"num_classes": 0, **m.timm_kwargs}
    try:
        json.dumps(args)
    except (TypeError, ValueError) as err:
        raise UserError(f"model.timm_kwargs cannot be written to config.json: {err}") from None
    return m.backbone, args


def _fixed_input_size(model: nn.Module) -> bool:
    """Whether the model accepts only its own image size (a ViT without dynamic_img_size)."""
    if not model.pretrained_cfg.get("fixed_input_size", False) or getattr(model, "dynamic_img_size", False):
        return False
    return bool(getattr(getattr(model, "patch_embed", None), "strict_img_size", True))


def pretrained_cfg(model: nn.Module, cfg: Config) -> dict[str, Any]:
    """timm's pretrained_cfg for the export: no classifier, and sslkit's evaluation preprocessing
    (the whole image resized to the view size, bilinear, normalised with the recipe's mean/std)."""
    a = cfg.augment
    out = {
        "num_classes": 0,  # equal to the model's: timm loads strictly and leaves the weights as they are
        "input_size": [3, a.size, a.size],
        "fixed_input_size": _fixed_input_size(model),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "squash",
        "mean": list(a.mean),
        "std": list(a.std),
    }
    for key in ("first_conv", "classifier"):
        if model.pretrained_cfg.get(key) is not None:
            out[key] = model.pretrained_cfg[key]
    return out


def _call_args(args: dict[str, Any]) -> str:
    if all(k.isidentifier() and not keyword.iskeyword(k) for k in args):
        return ", ".join(f"{k}={v!r}" for k, v in args.items())
    return f"**{args!r}"


def timm_load_line(arch: str, model_args: dict[str, Any], overlay: dict[str, Any]) -> str:
    """The Python that loads a ``timm`` export with timm alone."""
    rest = {k: v for k, v in model_args.items() if k != "num_classes"}
    lines = [
        "import timm",
        "model = timm.create_model(",
        f"    {arch!r}, pretrained=True, num_classes=0,",
        "    pretrained_cfg_overlay=dict(",
        *(f"        {k}={v!r}," for k, v in overlay.items()),
        "    ),",
    ]
    if rest:
        lines.append(f"    {_call_args(rest)},")
    lines.append(")")
    return "\n".join(lines)


def _summary(cfg: Config) -> dict[str, Any]:
    return {
        "method": cfg.method.name,
        "backbone": cfg.model.backbone,
        "timm_kwargs": dict(cfg.model.timm_kwargs),
        "data": cfg.data.name,
        "view_size": cfg.augment.size,
        "epochs": cfg.train.epochs,
        "max_steps": cfg.train.max_steps,
        "batch_size": cfg.train.batch_size,
        "optimizer": cfg.optim.name,
        "lr": cfg.optim.lr,
        "seed": cfg.train.seed,
    }


def _last_knn(run_dir: Path) -> Optional[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    scores = [json.loads(line) for line in path.read_text().splitlines() if '"knn_top1"' in line]
    return scores[-1] if scores else None


def _public_config(cfg: Config) -> dict[str, Any]:
    tree = cfg.to_dict()
    tree["data"]["root"] = None  # where the data lay on the training machine: of no use with the weights,
    del tree["train"]["output_dir"]  # and not to be published with them
    return tree


def _load_with_timm(fmt: str, folder: Path, arch: str, model_args: dict[str, Any],
                    overlay: Optional[dict[str, Any]]) -> nn.Module:
    """The export as its README loads it, with timm alone."""
    try:
        if fmt == "timm":
            kwargs = {k: v for k, v in model_args.items() if k != "num_classes"}
            return timm.create_model(arch, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay, **kwargs)
        return timm.create_model(f"local-dir:{folder}", pretrained=True)
    except Exception as err:  # any failure here means the export is unusable
        # the installed timm builds the model differently (another version): say so, keep nothing
        raise UserError(f"timm {timm.__version__} could not load the {fmt} export back: {err}") from err


def _check_same_features(reference: nn.Module, exported: nn.Module, size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=generator)
    was_training = reference.training
    reference.eval(), exported.eval()
    with torch.no_grad():
        expected, got = reference(x), exported(x)
    reference.train(was_training)
    try:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    except AssertionError as err:
        raise UserError(f"the export, loaded with timm, computes other features than sslkit: {err}") from None


def _card(cfg: Config, arch: str, name: str, source: Path, knn: Optional[dict[str, Any]], num_features: int) -> str:
    """README.md of an ``hf`` export: a Hub model card, with no local paths in it."""
    a, s = cfg.augment, _summary(cfg)
    kwargs = ", ".join(f"{k}={v!r}" for k, v in cfg.model.timm_kwargs.items()) or "none"
    rows = [
        ("method", s["method"]),
        ("architecture", f"`{arch}` (timm), model args: {kwargs}"),
        ("features", f"{num_features} per image (no classifier: `num_classes=0`)"),
        ("data", s["data"]),
        ("view size", f"{a.size} px"),
    ]
    epochs = f"{s['epochs']} epoch{'s' if s['epochs'] != 1 else ''}"
    steps = f", at most {s['max_steps']} steps" if s["max_steps"] else ""
    rows += [
        ("training", f"{epochs}{steps}, global batch {s['batch_size']}, {s['optimizer']} lr {s['lr']:g}, "
                     f"seed {s['seed']}"),
        ("weights", f"from `{source.name}`: the network sslkit's k-NN evaluates"
                    + (" (the teacher's backbone)" if cfg.method.name == "dino" else "")),
    ]
    if knn is not None:
        top5 = knn.get("knn_top5", float("nan"))
        rows.append(("k-NN (last logged)", f"top-1 {knn['knn_top1']:.4f}, top-5 {top5:.4f} on {s['data']} test"
                     f", k={cfg.eval.knn_k}, after epoch {knn.get('epoch', '?')}"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: timm
tags:
- image-feature-extraction
- timm
- sslkit
- self-supervised-learning
---

# {name}: {s['method']} {arch}

A feature extractor pretrained without labels by sslkit ({s['method']} on {s['data']}).
It maps an image to a {num_features}-dimensional feature vector.

| | |
|---|---|
{table}

## How to load it (timm alone)

```python
import timm
model = timm.create_model("hf-hub:<user>/<repo>", pretrained=True).eval()  # from the Hub
# or from a copy of this folder:
# model = timm.create_model("local-dir:path/to/this/folder", pretrained=True).eval()

data_config = timm.data.resolve_data_config(model=model)  # {a.size} px, resize without crop, the run's mean/std
transform = timm.data.create_transform(**data_config)
features = model(transform(image).unsqueeze(0))  # (1, {num_features}), image: a PIL image
```

sslkit evaluated the network on whole images resized to {a.size}x{a.size} (bilinear) and
normalised with mean {list(a.mean)} and std {list(a.std)}; `pretrained_cfg` in `config.json`
says the same.

## How to push it

```python
from huggingface_hub import upload_folder
upload_folder(repo_id="<user>/<repo>", folder_path="path/to/this/folder", repo_type="model")
```

## The sslkit config of the run

```yaml
{yaml.safe_dump(_public_config(cfg), sort_keys=False).rstrip()}
```
"""


def export_run(run_dir: str | Path, fmt: str = "timm", checkpoint: Optional[str | Path] = None,
               output: Optional[str | Path] = None) -> dict[str, Any]:
    """Export a run's feature network; returns ``{"folder", "source", "load"}`` (``load``: Python)."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    run_dir = Path(run_dir)
    source = find_checkpoint(run_dir, checkpoint)
    cfg, feature = load_feature_model(source)
    arch, model_args = timm_model_args(cfg)
    folder = (Path(output) if output is not None else run_dir / "export" / fmt).absolute()
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.safetensors"

    state = {k: v.detach().cpu().contiguous() for k, v in feature.state_dict().items()}
    meta = {"format": "pt", CONFIG_KEY: yaml.safe_dump(_public_config(cfg), sort_keys=False)}
    p_cfg = pretrained_cfg(feature, cfg)
    info = {"format": fmt, "checkpoint": source.name, **_summary(cfg)}
    config = {
        "architecture": timm.models.split_model_name_tag(arch)[0],
        "num_classes": 0,
        "num_features": int(feature.num_features),
        "model_args": model_args,
        "pretrained_cfg": p_cfg,
    }
    if fmt == "timm":
        # first_conv and classifier: timm's registry has them; the test-time size and crop are not the run's
        overlay = {"file": str(weights), "test_input_size": None, "test_crop_pct": None}
        overlay.update({k: tuple(v) if isinstance(v, list) else v for k, v in p_cfg.items()
                        if k not in ("first_conv", "classifier")})
        load = timm_load_line(arch, model_args, overlay)
        readme = (f"# {arch} pretrained with sslkit ({cfg.method.name})\n\nLoad it with timm alone:\n\n"
                  f"```python\n{load}\n```\n\n`config.json` holds the same arguments (its `model_args` and "
                  "`pretrained_cfg`, and this line as `sslkit.load`); change `file` if you move the folder.\n")
    else:
        overlay = None
        load = f'import timm\nmodel = timm.create_model("local-dir:{folder}", pretrained=True)'
        readme = _card(cfg, config["architecture"], cfg.train.name or run_dir.absolute().name, source,
                       _last_knn(run_dir) if checkpoint is None else None, config["num_features"])
    config["sslkit"] = {**info, "load": load} if fmt == "timm" else info  # (hf: no local paths)

    try:
        save_file(state, str(weights), metadata=meta)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "README.md").write_text(readme)
        # Load it back the documented way, with timm alone, before calling it done.
        _check_same_features(feature, _load_with_timm(fmt, folder, arch, model_args, overlay), cfg.augment.size)
    except BaseException:
        for name in FILES:
            (folder / name).unlink(missing_ok=True)
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise
    return {"folder": folder, "source": source, "load": load}
