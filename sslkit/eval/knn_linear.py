"""k-NN + linear: a linear probe's class probabilities interpolated with k-NN's.

Jia et al., "Rethinking Nearest Neighbors for Visual Classification" (arXiv 2112.08459, 2021):
p = lambda * p_knn + (1 - lambda) * p_linear, where p_knn is the normalised k-NN vote (each
class's summed exp(sim / T) over the k neighbours, divided by the sum over classes) and
p_linear the linear head's softmax. The two readouts err on different images, so the mixture
often beats both.

Protocol (:func:`knn_linear_eval`):

1. Draw a class-balanced validation split (``val_fraction`` of each class, seeded) from the
   TRAIN split; fit the probes (one head per lr) on the rest, with the rest as the k-NN bank.
2. Choose the lr, then lambda on a grid, by validation top-1 (lambda by the mixture's top-1).
3. Refit the chosen lr's head on the whole train split, use the whole train split as the bank,
   and report k-NN, linear and the mixture at the chosen lambda on the test split: lambda = 1 is
   exactly the k-NN result, lambda = 0 exactly the linear one. Nothing is chosen on the test split.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from sslkit.eval.fewshot import balanced_indices
from sslkit.eval.knn import knn_accuracy, knn_scores
from sslkit.eval.linear import (DEFAULT_EPOCHS, DEFAULT_LRS, fit_linear_heads, heads_accuracy, standardize,
                                topk_accuracy)

LAMBDAS = tuple(i / 20 for i in range(21))  # 0, 0.05, ..., 1


def interpolate(p_knn: Tensor, p_linear: Tensor, lam: float) -> Tensor:
    """lam * p_knn + (1 - lam) * p_linear, both (Q, C) probabilities."""
    return lam * p_knn + (1.0 - lam) * p_linear


def knn_probabilities(query: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, k: int,
                      temperature: float) -> Tensor:
    """(Q, C) k-NN vote distribution: :func:`~sslkit.eval.knn.knn_scores` normalised per row."""
    scores = knn_scores(query, bank, bank_labels, num_classes, k, temperature)  # (Q, C), every row > 0
    return scores / scores.sum(1, keepdim=True)


def linear_probabilities(weight: Tensor, bias: Tensor, feats: Tensor) -> Tensor:
    """(Q, C) softmax of one head, weight (D, C) and bias (C,), on (Q, D) features."""
    return torch.softmax(torch.addmm(bias, feats.float(), weight), dim=1)


def knn_linear_eval(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = DEFAULT_EPOCHS,
    val_fraction: float = 0.1,
    lambdas: Sequence[float] = LAMBDAS,
    seed: int = 0,
) -> dict:
    """k-NN, linear and their interpolation on the test split (module docstring).

    Args:
        train_feats: (N, D) features of the labelled train split; test_feats (Q, D).
        train_labels, test_labels: (N,), (Q,) int labels in [0, num_classes).
        k, temperature: the k-NN's neighbours and vote temperature.
        lrs, epochs: the linear probes' learning rates (one head each) and epochs.
        val_fraction: the share of each class held out to choose the lr and lambda.
        lambdas: the grid of lambda (the k-NN's weight).
        seed: draws the validation split and shuffles the probes' batches.

    Returns:
        ``{"lambda", "lr", "val_top1", "knn_top1", "knn_top5", "linear_top1", "linear_top5", "top1",
        "top5"}``: top1/top5 are the interpolation's; val_top1 the mixture's on the validation split.
    """
    # The k-NN reads the features as they are (as `eval knn` does), the probes standardised ones.
    train_std, test_std = standardize(train_feats, train_feats, test_feats)  # (N, D), (Q, D)
    val = balanced_indices(train_labels, val_fraction, seed, num_classes).to(train_feats.device)  # (V,)
    keep = torch.ones(train_labels.shape[0], dtype=torch.bool, device=train_feats.device)
    keep[val] = False
    fit = keep.nonzero().flatten()  # (N - V,)
    xv, yv = train_std[val], train_labels[val]

    # 1-2: choose lr, then lambda, on the validation split.
    weight, bias = fit_linear_heads(train_std[fit], train_labels[fit], num_classes, lrs, epochs, seed=seed)
    best = int(heads_accuracy(weight, bias, xv, yv)[0].argmax())  # the first of equals, as the full probe
    p_lin = linear_probabilities(weight[best], bias[best], xv)  # (V, C)
    p_knn = knn_probabilities(train_feats[val], train_feats[fit], train_labels[fit], num_classes, k,
                              temperature)  # (V, C)
    val_top1 = [topk_accuracy(interpolate(p_knn, p_lin, lam), yv)[0] for lam in lambdas]
    lam = lambdas[max(range(len(lambdas)), key=lambda i: val_top1[i])]

    # 3: the whole train split, scored on the test split.
    weight, bias = fit_linear_heads(train_std, train_labels, num_classes, (lrs[best],), epochs, seed=seed)
    p_lin = linear_probabilities(weight[0], bias[0], test_std)  # (Q, C)
    p_knn = knn_probabilities(test_feats, train_feats, train_labels, num_classes, k, temperature)  # (Q, C)
    knn = knn_accuracy(p_knn, test_labels)  # as `eval knn` counts: a class without votes is never predicted
    (lin1, lin5) = (float(a[0]) for a in heads_accuracy(weight, bias, test_std, test_labels))
    top1, top5 = topk_accuracy(interpolate(p_knn, p_lin, lam), test_labels)
    return {"lambda": lam, "lr": lrs[best], "val_top1": max(val_top1), **knn,
            "linear_top1": lin1, "linear_top5": lin5, "top1": top1, "top5": top5}
