"""Typed run configuration: a recipe YAML plus ``section.key=value`` overrides.

Every key is a dataclass field, so a typo is an error that names the nearest valid key,
and a value of the wrong type is an error that names the expected type.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from sslkit.errors import UserError
from sslkit.registry import did_you_mean


class ConfigError(UserError, ValueError):
    """A recipe or override that does not fit the config schema."""


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # a key of sslkit.data.DATASETS
    root: Optional[str] = None  # where the dataset lives; None: the dataset's default places
    download: bool = False  # allow torchvision's download (the only network access sslkit does)
    image_size: Optional[int] = None  # resize stored images (ImageFolder); None: keep the native size
    channels: int = 3  # grayscale becomes 3 channels for backbones that want RGB
    train_limit: Optional[int] = None  # use only the first N training images (quick runs, tests)
    test_limit: Optional[int] = None  # use only the first N test images
    num_workers: int = 2  # decoding workers for datasets that do not fit on the device
    bad_images: str = "error"  # an undecodable image file: error (stop, naming it) | skip (count it, use the next)
    decode: str = "workers"  # image files: workers (decode in loader workers) | device (JPEG on the GPU, nvjpeg)


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # any timm model name, or an sslkit one (tiny_cnn)
    small_stem: bool = False  # 3x3 stride-1 first conv and no max-pool, for 28-32 px images
    width: int = 32  # base width of sslkit's tiny_cnn (ignored by timm models)
    norm: str = "batch"  # tiny_cnn's normalisation: batch | group | none
    channels_last: bool = False
    sync_batchnorm: bool = False  # BatchNorm statistics over the global batch when several processes train
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model (img_size, patch_size, ...)


@dataclass
class MethodConfig:
    name: str = "simclr"  # a key of sslkit.methods.METHODS
    proj_hidden_dim: int = 2048
    proj_output_dim: int = 128
    proj_layers: int = 2
    proj_batch_norm: bool = True
    temperature: float = 0.5
    gather_distributed: bool = True  # negatives and batch statistics from every process, with their gradients
    # predictor MLP on the online branch (BYOL, MoCo v3)
    pred_hidden_dim: int = 4096
    pred_layers: int = 2
    # momentum (EMA) encoder (BYOL, DINO, MoCo v3): cosine from base to end over the run, per step
    momentum_base: float = 0.99
    momentum_end: float = 1.0
    # DINO
    bottleneck_dim: int = 256  # the head's last hidden width before its weight-normalised layer
    norm_last_layer: bool = True  # fix the weight norm of the head's last layer to 1
    freeze_last_layer_epochs: float = 1.0  # no updates to the head's last layer for this long
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0.0  # linear from warmup_teacher_temp to teacher_temp
    student_temp: float = 0.1
    center_momentum: float = 0.9
    # MAE
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True  # regress per-patch normalised pixels (the MAE paper's better target)
    # VICReg
    sim_weight: float = 25.0
    var_weight: float = 25.0
    cov_weight: float = 1.0
    # Barlow Twins
    redundancy_weight: float = 5e-3  # the lambda of the off-diagonal terms


@dataclass
class AugmentConfig:
    preset: str = "simclr"  # a key of sslkit.augment.PRESETS
    size: int = 32  # output side of every view
    scale: tuple[float, float] = (0.08, 1.0)  # random resized crop: area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random resized crop: aspect ratio
    hflip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 0  # odd kernel side; 0: about a tenth of the view size
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    solarize_prob: float = 0.0
    # per-view probabilities of asymmetric presets (byol, dino: first view, second view[, local views]);
    # empty: the method paper's values
    view_blur_probs: tuple[float, ...] = ()
    view_solarize_probs: tuple[float, ...] = ()
    # multi-crop (dino): small views besides the two global ones, which use size and scale
    local_crops: int = 0
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | lars | adamw
    lr: float = 0.06  # base learning rate, for a global batch of lr_batch_size
    lr_batch_size: Optional[int] = 128  # lr scales linearly with batch/lr_batch_size; None: no scaling
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    clip_grad_norm: Optional[float] = None
    lars_trust_coefficient: float = 0.001
    exclude_bias_norm: bool = True  # no weight decay (and no LARS scaling) on biases and norms


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 512  # global: split across processes
    max_steps: Optional[int] = None  # stop early after this many optimiser steps
    grad_accum_steps: int = 1
    precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    output_dir: str = "runs"
    name: Optional[str] = None  # run directory is output_dir/name; None: recipe name
    log_every_steps: int = 10  # host reads of loss/lr (no device sync in between)
    checkpoint_every_epochs: int = 1
    checkpoint_every_steps: Optional[int] = None  # also checkpoint mid-epoch every N optimiser steps
    keep_checkpoints: int = 2  # older checkpoints are deleted
    max_nonfinite_steps: int = 5  # stop after this many steps in a row with a NaN/Inf loss or gradient
    progress: bool = True
    trackers: tuple[str, ...] = ()  # also log metrics to Accelerate trackers: tensorboard, wandb, ...
    cpu: bool = False  # run on the CPU even where a GPU is present
    compile: bool = False  # torch.compile the networks (eager, with a warning, where compiling fails)


@dataclass
class EvalConfig:
    knn: bool = True
    every_epochs: int = 1
    at_start: bool = True  # score the untrained network too
    knn_k: int = 20  # the k of knn_top1/knn_top5
    knn_ks: tuple[int, ...] = ()  # more k from the same search, logged as knn_top1_k<k>
    knn_temperature: float = 0.07
    batch_size: int = 512
    bank_limit: Optional[int] = None  # use only the first N training images as the bank
    test_limit: Optional[int] = None
    online_probe: bool = True  # a linear head on detached backbone features, trained alongside
    online_lr: float = 0.1  # its learning rate (no weight decay; follows the same schedule)
    collapse_every_steps: int = 50  # embedding std and effective rank of a batch; 0: off


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resume: bool = False  # continue from the run directory's last checkpoint
    overwrite: bool = False  # start afresh in a run directory that already holds a run

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    """Tuples become lists so that yaml.safe_dump writes plain YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check_value(path: str, value: Any, hint: Any) -> Any:
    """Return ``value`` converted to ``hint``, or raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(path, value, inner[0])
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values, got {value!r}")
        return value
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(_check_value(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_check_value(f"{path}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-3 (no decimal point) as text
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if hint in (int, float, str) and (not isinstance(value, hint) or isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            raise ConfigError(f"unknown config key '{path}'{did_you_mean(path, valid)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a section of keys, got {value!r}")
            kwargs[key] = _build(hint, value, f"{path}.")
        else:
            kwargs[key] = _check_value(path, value, hint)
    return cls(**kwargs)


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set ``a.b=value`` in a nested dict; the value is parsed as YAML (``0.3``, ``true``, ``[1, 2]``)."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key=value (e.g. optim.lr=0.3)")
    key, raw = override.split("=", 1)
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{override}': '{part}' is a value, not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a recipe YAML (or start from the defaults) and apply ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe '{path}' does not exist; recipes live in recipes/*.yaml")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"recipe '{path}' must be a mapping of sections, got {type(tree).__name__}")
    for override in overrides:
        apply_override(tree, override)
    cfg = config_from_dict(tree)
    if cfg.train.name is None and path is not None:
        cfg.train.name = Path(path).stem
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    return _build(Config, tree, "")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
