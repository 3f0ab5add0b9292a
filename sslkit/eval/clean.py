"""Clean (unaugmented) evaluation data: the splits, their batches over processes, the transform.

Every protocol (k-NN, linear probe, few-shot, plots) embeds the same way: the train split of
the evaluation data (``eval.data``, by default the training data) is the bank or probe
training set, its test split the queries, each image resized to the recipe's view size and
normalised, every sample seen once across processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

from accelerate import Accelerator
from torch import Tensor, nn

from sslkit.augment import eval_transform
from sslkit.config import Config, DataConfig, apply_override, config_from_dict
from sslkit.data import Batches, load_dataset, make_batches
from sslkit.errors import UserError
from sslkit.eval.features import extract_features


class CleanFeatures(NamedTuple):
    """Frozen features of both splits of the evaluation data, gathered over processes."""

    train: Tensor  # (N, D) float32
    train_labels: Tensor  # (N,) int64
    test: Tensor  # (Q, D) float32
    test_labels: Tensor  # (Q,) int64
    num_classes: int


def evaluation_setup(
    checkpoint: str | Path,
    data: Optional[str] = None,
    data_root: Optional[str] = None,
    settings: Optional[dict[str, Any]] = None,
    overrides: Sequence[str] = (),
) -> tuple[Config, nn.Module, Accelerator]:
    """The checkpoint's config and feature network, pointed at the data to evaluate on.

    Args:
        checkpoint: a checkpoint directory or a ``backbone.safetensors``.
        data: a dataset name (a data section of its own: the training data's shared keys such as
            channels and image_size, not its source's own keys); None: the run's ``eval.data``,
            else its training data.
        data_root: where that dataset lives.
        settings: ``{"section.key": value}`` set before the overrides (e.g. ``eval.bank_limit``).
        overrides: ``section.key=value`` strings, validated as ``train``'s are.

    Returns:
        (config, feature network on the accelerator's device, accelerator).
    """
    # the engine imports this module
    from sslkit.engine.checkpoint import load_feature_model
    from sslkit.engine.trainer import create_accelerator

    cfg, model = load_feature_model(checkpoint)
    tree = cfg.to_dict()
    if data is None:
        tree["data"] = {**(tree["eval"]["data"] or tree["data"]), "train_limit": None, "test_limit": None}
        if data_root is not None:
            tree["data"]["root"] = data_root
    else:
        shared = {key: tree["data"][key] for key in DataConfig.model_fields if key in tree["data"]}
        tree["data"] = {**shared, "name": data, "root": data_root, "train_limit": None, "test_limit": None}
    tree["eval"]["data"] = None  # the training run's limits do not apply; eval.bank_limit/test_limit do
    for key, value in (settings or {}).items():
        section, name = key.split(".")
        tree[section][name] = value
    for override in overrides:
        apply_override(tree, override)
    cfg = config_from_dict(tree)
    accelerator = create_accelerator(cfg.train)
    return cfg, model.to(accelerator.device), accelerator


def eval_data(cfg: Config) -> DataConfig:
    """The data section of the labelled set: ``eval.data``, or the training data when it is unset."""
    return cfg.data if cfg.eval.data is None else cfg.eval.data


def no_labels_reason(cfg: Config) -> str:
    """Why the evaluation data has no labels, and what to do: for the line that turns k-NN off."""
    data = eval_data(cfg)
    where = "eval.data" if cfg.eval.data is not None else "the training data"
    fix = ("point eval.data at a labelled set (e.g. eval.data.name=fashion_mnist, or an image_folder of "
           "class folders)")
    return f"{where} ({data.name}{' ' + data.root if data.root else ''}) has no labels: {fix}"


def clean_splits(cfg: Config, bank: Any = None) -> tuple[Any, Any]:
    """(train split, test split) of ``eval_data(cfg)``, limited by ``eval.bank_limit``/``test_limit``;
    a set without labels is an error saying what to do.

    ``bank``: the train split, when the caller has it loaded already.
    """
    data = eval_data(cfg)
    bank = load_dataset(data, "train") if bank is None else bank
    if bank.num_classes == 0:
        raise UserError(f"evaluation needs labels, and {no_labels_reason(cfg)}")
    test = load_dataset(data, "test")
    bank = bank if cfg.eval.bank_limit is None else bank.head(cfg.eval.bank_limit)
    test = test if cfg.eval.test_limit is None else test.head(cfg.eval.test_limit)
    return bank, test


def clean_batches(cfg: Config, accelerator: Optional[Accelerator], data: Any) -> Batches:
    """In order, every sample once over all processes (``accelerator`` None: one CPU process)."""
    workers = eval_data(cfg).num_workers
    if accelerator is None:
        return make_batches(data, cfg.eval.batch_size, shuffle=False, drop_last=False, seed=0, num_workers=workers)
    return make_batches(
        data, cfg.eval.batch_size, shuffle=False, drop_last=False, seed=0,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
        device=accelerator.device, num_workers=workers,
    )


def clean_transform(cfg: Config) -> Callable[[Tensor, Optional[Tensor]], Tensor]:
    """(uint8 images, their own sizes or None) -> the normalised views of ``eval_transform``."""
    a = cfg.augment
    return lambda images, sizes=None: eval_transform(images, a.size, a.mean, a.std, sizes)


def clean_features(
    cfg: Config, model: nn.Module, accelerator: Accelerator, bank: Optional[Any] = None
) -> CleanFeatures:
    """Features of both splits, gathered on every process."""
    train, test = clean_splits(cfg, bank)
    transform = clean_transform(cfg)
    train_f, train_l = extract_features(model, clean_batches(cfg, accelerator, train), transform, accelerator)
    test_f, test_l = extract_features(model, clean_batches(cfg, accelerator, test), transform, accelerator)
    return CleanFeatures(train_f, train_l, test_f, test_l, train.num_classes)
