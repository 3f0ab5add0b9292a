"""Few-shot linear probes: N labelled train images per class, several seeded draws.

Protocol (:func:`fewshot_eval`), for every N in ``shots`` and every seed:

1. Draw N train samples per class (:func:`fewshot_indices`), and a disjoint balanced
   validation set of ``val_per_class`` further train samples per class.
2. Standardise all features with the mean/std of the WHOLE train split: that uses no
   labels, and 1-10 samples per class are too few to estimate a per-dimension std.
3. Train one linear head per lr on the N-shot subset (:func:`fit_linear_heads`), full batch
   (every "epoch" is one step over all N * C samples) for 300 steps: tiny sets need many
   more steps, and mini-batches would only add noise.
4. Pick the lr with the best validation top-1 and report that head's test top-1/top-5.

The lr is thus chosen without the test set, but on ``val_per_class`` * C extra labelled
samples, so the result is not strictly N-shot; pass one lr (``lrs=(0.1,)``) for a strictly
N-shot protocol with a fixed lr (the validation set is then unused but still drawn).
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from sslkit.errors import UserError
from sslkit.eval.linear import DEFAULT_LRS, fit_linear_heads, heads_accuracy, standardize, train_linear_probes

# Full-batch steps for the N-shot subsets (see the module docstring).
FEWSHOT_EPOCHS = 300


def fewshot_indices(labels: Tensor, shots: int, seed: int, num_classes: int | None = None) -> Tensor:
    """Indices of exactly ``shots`` samples of every class, drawn without repeats.

    Args:
        labels: (N,) int labels.
        shots: samples per class.
        seed: the same seed gives the same indices.
        num_classes: the classes are 0..num_classes-1 (a class without samples is an
            error); None: the classes present in ``labels``.

    Returns:
        (num_classes * shots,) int64 indices into ``labels``, sorted.

    Raises:
        UserError: a class has fewer than ``shots`` samples.
    """
    return _draw_per_class(labels, lambda n_c: shots, seed, num_classes)


def balanced_indices(labels: Tensor, fraction: float, seed: int, num_classes: int | None = None) -> Tensor:
    """A class-balanced ``fraction`` of the samples: round(fraction * n_c), at least 1, of each class.

    The semi-supervised protocol of SimCLR (Chen et al., ICML 2020) and BYOL (Grill et al.,
    NeurIPS 2020): 1% or 10% of the ImageNet labels, the same share of every class. The same
    seed gives the same subset; the subset of a class is a prefix of one seeded permutation, so
    a smaller fraction's subset is contained in a larger one's (same seed).

    Args:
        labels: (N,) int labels.
        fraction: in (0, 1].
        seed, num_classes: as in :func:`fewshot_indices`.

    Returns:
        (M,) int64 indices into ``labels``, sorted.
    """
    check_fraction(fraction)
    return _draw_per_class(labels, lambda n_c: max(1, round(fraction * n_c)), seed, num_classes)


def check_fraction(fraction: float) -> None:
    """A label fraction outside (0, 1] is a user error."""
    if not 0 < fraction <= 1:
        raise UserError(f"label fraction {fraction:g} is out of range: give a fraction in (0, 1], e.g. 0.01 or 0.1")


def _draw_per_class(labels: Tensor, count: Callable[[int], int], seed: int, num_classes: int | None) -> Tensor:
    """``count(n_c)`` samples of each class c (n_c of them in ``labels``), seeded, sorted."""
    labels = labels.cpu().long()
    classes = range(num_classes) if num_classes is not None else labels.unique().tolist()
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for c in classes:
        members = (labels == c).nonzero().flatten()  # (n_c,)
        wanted = count(members.numel())
        if members.numel() < wanted:
            raise UserError(f"class {c} has {members.numel()} samples, fewer than the {wanted} asked for")
        picked.append(members[torch.randperm(members.numel(), generator=generator)[:wanted]])
    return torch.cat(picked).sort().values


def fewshot_eval(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    shots: Sequence[int] = (1, 5, 10),
    seeds: Sequence[int] = (0, 1, 2),
    val_per_class: int = 20,
    normalize: bool = True,
    **probe_kwargs: Any,
) -> dict:
    """N-shot linear-probe accuracy on the test features, averaged over seeded draws.

    Args:
        train_feats: (N, D) features of the labelled pool to draw from.
        train_labels: (N,) int labels in [0, num_classes).
        test_feats: (Q, D) features to score on.
        test_labels: (Q,) int labels.
        num_classes: C.
        shots: the N of each few-shot setting.
        seeds: one draw (subset, validation set, shuffle) per seed.
        val_per_class: validation samples per class for choosing the lr.
        normalize: standardise with the whole train split (module docstring).
        probe_kwargs: for :func:`fit_linear_heads` (lrs, epochs, batch_size, weight_decay);
            by default full batch for FEWSHOT_EPOCHS steps.

    Returns:
        ``{N: {"mean_top1", "std_top1", "runs": [{"seed", "lr", "val_top1", "top1", "top5"}, ...]}}``,
        one run per seed; ``std_top1`` is the sample std over seeds (0.0 for one seed).
    """
    if normalize:
        train_feats, test_feats = standardize(train_feats, train_feats, test_feats)
    probe_kwargs = {"epochs": FEWSHOT_EPOCHS, "batch_size": len(train_labels), **probe_kwargs}
    lrs = probe_kwargs.pop("lrs", DEFAULT_LRS)
    all_idx = torch.arange(len(train_labels))
    results = {}
    for n in shots:
        runs = []
        for seed in seeds:
            subset = fewshot_indices(train_labels, n, seed, num_classes)  # (C * n,)
            rest = all_idx[~torch.isin(all_idx, subset)]  # (N - C * n,)
            val = rest[fewshot_indices(train_labels[rest], val_per_class, seed, num_classes)]  # (C * val_per_class,)
            weight, bias = fit_linear_heads(
                train_feats[subset], train_labels[subset], num_classes, lrs, seed=seed, **probe_kwargs
            )
            val_top1, _ = heads_accuracy(weight, bias, train_feats[val], train_labels[val])  # (L,)
            top1, top5 = heads_accuracy(weight, bias, test_feats, test_labels)  # (L,), (L,)
            best = int(val_top1.argmax())
            runs.append({"seed": seed, "lr": lrs[best], "val_top1": float(val_top1[best]),
                         "top1": float(top1[best]), "top5": float(top5[best])})
        results[n] = mean_and_spread(runs)
    return results


def fraction_linear_eval(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    fractions: Sequence[float] = (0.01, 0.1),
    seeds: Sequence[int] = (0, 1, 2),
    **probe_kwargs: Any,
) -> dict:
    """Linear probes trained on class-balanced ``fractions`` of the train labels, one draw per seed.

    The semi-supervised protocol of SimCLR and BYOL (:func:`balanced_indices`) with a frozen
    backbone. The features are standardised with the whole train split (that needs no labels),
    as for few-shot probes; each draw's lr is chosen on the test split, as for the full probe
    (:func:`~sslkit.eval.linear.train_linear_probes`, which ``probe_kwargs`` go to).

    Returns:
        ``{fraction: {"mean_top1", "std_top1", "runs": [{"seed", "images", "top1", "top5", "best_lr"}, ...]}}``.
    """
    train_feats, test_feats = standardize(train_feats, train_feats, test_feats)  # (N, D), (Q, D)
    results = {}
    for fraction in fractions:
        runs = []
        for seed in seeds:
            idx = balanced_indices(train_labels, fraction, seed, num_classes).to(train_feats.device)  # (M,)
            r = train_linear_probes(train_feats[idx], train_labels[idx], test_feats, test_labels, num_classes,
                                    normalize=False, seed=seed, **probe_kwargs)
            runs.append({"seed": seed, "images": idx.numel(), "top1": r["top1"], "top5": r["top5"],
                         "best_lr": r["best_lr"]})
        results[fraction] = mean_and_spread(runs)
    return results


def mean_and_spread(runs: list[dict]) -> dict:
    """``{"mean_top1", "std_top1" (sample std over runs; 0.0 for one), "runs"}`` of runs with a ``top1``."""
    top1s = [r["top1"] for r in runs]
    return {"mean_top1": statistics.fmean(top1s), "std_top1": statistics.stdev(top1s) if len(top1s) > 1 else 0.0,
            "runs": runs}
