"""Clean (unaugmented) evaluation data: the splits, their batches over processes, the transform.

Every protocol (k-NN, linear probe, few-shot, plots) embeds the same way: the train split is
the bank or probe training set, the test split the queries, each image resized to the
recipe's view size and normalised, every sample seen once across processes.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from accelerate import Accelerator
from torch import Tensor, nn

from sslkit.augment import eval_transform
from sslkit.config import Config
from sslkit.data import Batches, load_dataset, make_batches
from sslkit.eval.features import extract_features


def clean_splits(cfg: Config, bank: Any = None) -> tuple[Any, Any]:
    """(train split, test split), limited by ``eval.bank_limit``/``test_limit``.

    ``bank``: the train split, when the caller has it loaded already.
    """
    bank = load_dataset(cfg.data, "train") if bank is None else bank
    test = load_dataset(cfg.data, "test")
    bank = bank if cfg.eval.bank_limit is None else bank.head(cfg.eval.bank_limit)
    test = test if cfg.eval.test_limit is None else test.head(cfg.eval.test_limit)
    return bank, test


def clean_batches(cfg: Config, accelerator: Optional[Accelerator], data: Any) -> Batches:
    """In order, every sample once over all processes (``accelerator`` None: one CPU process)."""
    if accelerator is None:
        return make_batches(data, cfg.eval.batch_size, shuffle=False, drop_last=False, seed=0,
                            num_workers=cfg.data.num_workers)
    return make_batches(
        data, cfg.eval.batch_size, shuffle=False, drop_last=False, seed=0,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
        device=accelerator.device, num_workers=cfg.data.num_workers,
    )


def clean_transform(cfg: Config) -> Callable[[Tensor], Tensor]:
    a = cfg.augment
    return lambda images: eval_transform(images, a.size, a.mean, a.std)


def clean_features(
    cfg: Config, model: nn.Module, accelerator: Accelerator, bank: Optional[Any] = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Features of both splits, gathered: (train (N, D), train labels, test (Q, D), test labels, classes)."""
    train, test = clean_splits(cfg, bank)
    transform = clean_transform(cfg)
    train_f, train_l = extract_features(model, clean_batches(cfg, accelerator, train), transform, accelerator)
    test_f, test_l = extract_features(model, clean_batches(cfg, accelerator, test), transform, accelerator)
    return train_f, train_l, test_f, test_l, train.num_classes
