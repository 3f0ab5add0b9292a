"""Typed, validated run configuration: a recipe YAML plus ``section.key=value`` overrides.

Each section is a pydantic model that forbids unknown keys and checks every value (ranges,
closed sets of choices, ordered ranges), so a bad recipe or override is one line that names the
key, the value and what is allowed, with the nearest valid key for a typo.

Sections whose keys depend on a choice (``method.name``, ``augment.preset``, ``optim.name``) are
"kind" sections: the choice looks up a registry entry (``METHODS``, ``PRESETS``, ``OPTIMIZERS``),
and the entry's own config class, declared beside its code with its paper's defaults, validates
the rest of the section. A method's key on another method is an error naming that method's keys.
"""

from __future__ import annotations

import importlib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from sslkit.errors import UserError
from sslkit.registry import Registry, did_you_mean


class ConfigError(UserError):
    """A recipe, override or option that does not fit the config schema."""


def _ordered(value: tuple[float, float]) -> tuple[float, float]:
    if value[0] > value[1]:
        raise ValueError(f"the range must be ordered low <= high, got [{value[0]}, {value[1]}]")
    return value


# Value types shared by the sections: each names what it allows in its error message.
Probability = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Range = Annotated[tuple[float, float], AfterValidator(_ordered)]
FractionRange = Annotated[tuple[Fraction, Fraction], AfterValidator(_ordered)]
PositiveRange = Annotated[tuple[Positive, Positive], AfterValidator(_ordered)]


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class KindSection(Section):
    """A section whose ``kind_key`` (``name`` or ``preset``) picks a registry entry; each entry
    declares a subclass with its own keys and defaults (``Registry.register(name, config=...)``)."""

    kind_key: ClassVar[str] = "name"


class DataConfig(KindSection):
    """The keys every data source shares. ``name`` picks the source in ``sslkit.data.DATASETS``;
    a source with keys of its own (``image_folder``'s ``labels``, ``file_list``'s columns)
    subclasses this beside its code and registers it: ``@DATASETS.register(name, config=...)``.
    Sources that do not use a key (``image_size`` for Fashion-MNIST) ignore it."""

    name: str = "fashion_mnist"  # a key of sslkit.data.DATASETS
    root: Optional[str] = None  # where the dataset lives; None: the dataset's default places
    download: bool = False  # allow torchvision's download (the only network access sslkit does)
    image_size: Optional[Count] = None  # image files: the side every image is resized to; None: native size
    channels: Literal[1, 3] = 3  # grayscale becomes 3 channels for backbones that want RGB
    train_limit: Optional[Count] = None  # use only the first N training images (quick runs, tests)
    test_limit: Optional[Count] = None  # use only the first N test images
    num_workers: Annotated[int, Field(ge=0)] = 2  # decoding workers for datasets that do not fit on the device
    bad_images: Literal["error", "skip"] = "error"  # an undecodable image: stop, naming it | count it, use the next
    decode: Literal["workers", "device"] = "workers"  # image files: in loader workers | JPEG on the device (nvjpeg)

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        from sslkit.data import DATASETS  # the data package imports this module

        if name not in DATASETS:
            raise ValueError(DATASETS.unknown(name))
        return name


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` (no decimal point) as text: such text becomes the number."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value.strip()):
        return float(value)
    return value


class ModelConfig(Section):
    backbone: str = "resnet18"  # any timm model name, or an sslkit one (tiny_cnn)
    small_stem: bool = False  # 3x3 stride-1 first conv and no max-pool, for 28-32 px images
    width: Count = 32  # base width of sslkit's tiny_cnn (ignored by timm models)
    norm: Literal["batch", "group", "none"] = "batch"  # tiny_cnn's normalisation
    channels_last: bool = False
    sync_batchnorm: bool = False  # BatchNorm statistics over the global batch when several processes train
    timm_kwargs: dict[str, Any] = {}  # passed to timm.create_model (img_size, patch_size, drop_path_rate, ...)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        from sslkit.models.backbones import check_backbone_name  # timm only when a config is built

        return check_backbone_name(name)

    @field_validator("timm_kwargs")
    @classmethod
    def _numbers(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {key: _yaml_number(value) for key, value in kwargs.items()}


class EvalConfig(Section):
    # the labelled set whose train and test splits feed the k-NN monitor and `sslkit eval`, a data
    # section of its own ({name: fashion_mnist}); None: the training data (when it has labels)
    data: Optional[SerializeAsAny[DataConfig]] = None
    knn: bool = True
    every_epochs: Count = 1
    at_start: bool = True  # score the untrained network too
    knn_k: Count = 20  # the k of knn_top1/knn_top5
    knn_ks: tuple[Count, ...] = ()  # more k from the same search, logged as knn_top1_k<k>
    knn_temperature: Positive = 0.07
    batch_size: Count = 512
    bank_limit: Optional[Count] = None  # use only the first N training images as the bank
    test_limit: Optional[Count] = None
    online_probe: bool = True  # a linear head on detached backbone features, trained alongside
    online_lr: Positive = 0.1  # its learning rate (no weight decay; follows the same schedule)
    collapse_every_steps: Annotated[int, Field(ge=0)] = 50  # embedding std and effective rank of a batch; 0: off

    @field_validator("data", mode="before")
    @classmethod
    def _data(cls, value: Any) -> Any:
        return None if value is None else resolve_kind("data", value, "fashion_mnist", "eval.data")


class TrainConfig(Section):
    epochs: Count = 100
    batch_size: Count = 512  # global: split across processes
    max_steps: Optional[Count] = None  # stop early after this many optimiser steps
    grad_accum_steps: Count = 1
    precision: Literal["no", "bf16", "fp16"] = "no"
    seed: Annotated[int, Field(ge=0)] = 0
    output_dir: str = "runs"
    name: Optional[str] = None  # run directory is output_dir/name; None: recipe name
    log_every_steps: Count = 10  # host reads of loss, lr and schedules (no device sync in between)
    checkpoint_every_epochs: Count = 1
    checkpoint_every_steps: Optional[Count] = None  # also checkpoint mid-epoch every N optimiser steps
    keep_checkpoints: Count = 2  # older checkpoints are deleted
    max_nonfinite_steps: Annotated[int, Field(ge=0)] = 5  # stop after this many NaN/Inf steps in a row; 0: off
    progress: bool = True
    trackers: tuple[str, ...] = ()  # also log metrics to Accelerate trackers: tensorboard, wandb, ...
    cpu: bool = False  # run on the CPU even where a GPU is present
    compile: bool = False  # torch.compile the networks (eager, with a warning, where compiling fails)


class MethodConfig(KindSection):
    """A method's section; each method subclasses it with its own keys and its paper's defaults
    (``METHODS.register(name, config=...)``). ``preset``: the augment preset a recipe that names
    none gets."""

    preset: ClassVar[str] = "simclr"
    name: str = "simclr"  # a key of sslkit.methods.METHODS


def _odd_or_zero(kernel: int) -> int:
    if kernel and (kernel < 3 or kernel % 2 == 0):
        raise ValueError(f"expected 0 (a tenth of the view size) or an odd kernel side >= 3, got {kernel}")
    return kernel


class AugmentConfig(KindSection):
    """The keys every augment preset shares: one view's crop, flip, colour, blur and
    normalisation. Presets with more (per-view probabilities, multi-crop) subclass it."""

    kind_key: ClassVar[str] = "preset"
    preset: str = "simclr"  # a key of sslkit.augment.PRESETS
    size: Count = 32  # output side of every view
    scale: FractionRange = (0.08, 1.0)  # random resized crop: area fraction
    ratio: PositiveRange = (3 / 4, 4 / 3)  # random resized crop: aspect ratio
    hflip_prob: Probability = 0.5
    jitter_prob: Probability = 0.8
    brightness: NonNegative = 0.4
    contrast: NonNegative = 0.4
    saturation: NonNegative = 0.4
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.1
    gray_prob: Probability = 0.2
    blur_prob: Probability = 0.0
    blur_sigma: PositiveRange = (0.1, 2.0)
    blur_kernel: Annotated[int, AfterValidator(_odd_or_zero)] = 0  # odd kernel side; 0: about a tenth of the view
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[Positive, Positive, Positive] = (0.229, 0.224, 0.225)
    solarize_prob: Probability = 0.0
    # kornia.augmentation modules applied to every view after the preset's ops, before normalisation:
    # [{name: RandomSharpness, sharpness: 0.5, p: 0.3}, ...]
    extra: tuple[dict[str, Any], ...] = ()

    @field_validator("extra")
    @classmethod
    def _kornia_names(cls, extra: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
        from sslkit.augment.extra import extra_from_config  # kornia only when extras are named

        if extra:
            extra_from_config(extra)  # an unknown name or bad arguments: one line naming augment.extra[i]
        return extra


class OptimConfig(KindSection):
    """What every optimiser shares: the learning-rate and weight-decay schedules, clipping.
    Each optimiser subclasses it with its own keys (``OPTIMIZERS.register(name, config=...)``)."""

    name: str = "sgd"  # a key of sslkit.engine.optim.OPTIMIZERS
    lr: Positive = 0.06  # peak learning rate, for a global batch of lr_batch_size
    lr_batch_size: Optional[Count] = 128  # lr scales linearly with batch/lr_batch_size; None: no scaling
    warmup_epochs: NonNegative = 0.0  # linear warm-up from 0 to the peak
    min_lr_ratio: Probability = 0.0  # then a cosine down to lr * min_lr_ratio
    weight_decay: NonNegative = 5e-4
    weight_decay_end: Optional[NonNegative] = None  # a cosine from weight_decay to this (DINO); None: constant
    clip_grad_norm: Optional[Positive] = None
    exclude_bias_norm: bool = True  # no weight decay (and no LARS scaling) on biases and norms


def _registry(section: str) -> Registry:
    """The registry whose entries' configs make up a kind section (imported on first use: the
    registries' modules import this one)."""
    module, name = {"method": ("sslkit.methods", "METHODS"), "augment": ("sslkit.augment", "PRESETS"),
                    "optim": ("sslkit.engine.optim", "OPTIMIZERS"), "data": ("sslkit.data", "DATASETS")}[section]
    return getattr(importlib.import_module(module), name)


def resolve_kind(section: str, value: Any, default: str, prefix: Optional[str] = None) -> Any:
    """A kind section's mapping validated by the config class of the entry it names (``default``
    when it names none); a config object is re-validated by that class when it is a base config
    naming an entry with keys of its own. ``prefix``: the section's place in the config, for
    messages (``eval.data``; default ``section``)."""
    registry = _registry(section)
    prefix = prefix or section
    key = registry.base_config.kind_key
    if isinstance(value, registry.base_config):
        own = registry.config(getattr(value, key))
        return value if isinstance(value, own) else validate(own, value.model_dump(exclude_unset=True), prefix)
    if not isinstance(value, dict):
        return value  # something pydantic will reject with its own message
    name = value.get(key, default)
    if not isinstance(name, str) or name not in registry:
        raise ConfigError(f"{prefix}.{key}={name!r}: {registry.unknown(str(name))}")
    return validate(registry.config(name), {**value, key: name}, prefix, owner=f" of {registry.kind} {name!r}")


class Config(Section):
    data: SerializeAsAny[DataConfig] = Field(default_factory=dict, validate_default=True)
    model: ModelConfig = ModelConfig()
    # SerializeAsAny: each is a subclass (the chosen kind's own config), dumped with all its keys
    # A kind section left out is its default kind's config, resolved by the validators below.
    method: SerializeAsAny[MethodConfig] = Field(default_factory=dict, validate_default=True)
    augment: SerializeAsAny[AugmentConfig] = Field(default_factory=dict, validate_default=True)
    optim: SerializeAsAny[OptimConfig] = Field(default_factory=dict, validate_default=True)
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    resume: bool = False  # continue from the run directory's last good checkpoint
    overwrite: bool = False  # start afresh in a run directory that already holds a run

    @field_validator("data", mode="before")
    @classmethod
    def _data(cls, value: Any) -> Any:
        return resolve_kind("data", value, "fashion_mnist")

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> Any:
        return resolve_kind("method", value, "simclr")

    @field_validator("augment", mode="before")
    @classmethod
    def _augment(cls, value: Any, info: ValidationInfo) -> Any:
        # A recipe that names no preset gets its method's (DINO: multicrop, MAE: single, ...).
        method = info.data.get("method")
        return resolve_kind("augment", value, getattr(method, "preset", "simclr"))

    @field_validator("optim", mode="before")
    @classmethod
    def _optim(cls, value: Any) -> Any:
        return resolve_kind("optim", value, "sgd")

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able values (tuples as lists), every key of every section."""
        return self.model_dump(mode="json")


def _location(loc: tuple[Any, ...]) -> str:
    """``("eval", "knn_ks", 1)`` -> ``eval.knn_ks[1]``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _section_of(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The section class that holds the key at ``loc``."""
    for part in loc[:-1]:
        model = model.model_fields[part].annotation
    return model


def _message(error: dict[str, Any], model: type[BaseModel], prefix: str, owner: str) -> str:
    """One line for pydantic's error: the key, the value and what is allowed."""
    loc = tuple(error["loc"])
    path = _location((prefix, *loc) if prefix else loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        keys = list(_section_of(model, loc).model_fields)
        section = path.rpartition(".")[0]
        valid = [f"{section}.{k}" if section else k for k in keys]
        return (f"unknown config key '{path}'{owner}{did_you_mean(path, valid)}"
                + (f"; its keys: {', '.join(keys)}" if owner else ""))
    if kind.startswith("bool"):
        allowed = "expected true or false"
    elif kind in ("tuple_type", "too_short", "too_long"):
        allowed = "expected a list" + _tuple_length(_section_of(model, loc), loc)
    elif kind in ("model_type", "model_attributes_type"):
        allowed = "expected a section of keys"
    elif kind == "dict_type":
        allowed = "expected a mapping of keys to values"
    else:
        allowed = error["msg"].removeprefix("Value error, ").replace("Input should be", "expected")
        allowed = allowed.replace("a valid integer", "an int").replace("a valid number", "a float")
    return f"{path}={error.get('input')!r}: {allowed}"


def _tuple_length(section: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """' of N values' for a fixed-length tuple field, else ''."""
    field = section.model_fields.get(loc[-1]) if isinstance(loc[-1], str) else None
    args = typing.get_args(field.annotation) if field else ()
    return f" of {len(args)} values" if args and Ellipsis not in args else ""


def validate(model: type[Section], tree: dict[str, Any], prefix: str = "", owner: str = "") -> Any:
    """``model.model_validate(tree)``, a failure as one ConfigError line naming the key; ``prefix``:
    the section's own place in the config, ``owner``: the kind it belongs to, for the message."""
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_message(err.errors()[0], model, prefix, owner)) from None


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
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{override}': the value is not valid YAML ({err.problem})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a recipe YAML (or start from the defaults) and apply ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe '{path}' does not exist; recipes live in recipes/*.yaml")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"recipe '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"recipe '{path}' must be a mapping of sections, got {type(tree).__name__}")
    for override in overrides:
        apply_override(tree, override)
    cfg = config_from_dict(tree)
    if cfg.train.name is None and path is not None:
        cfg.train.name = Path(path).stem
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    return validate(Config, tree)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
