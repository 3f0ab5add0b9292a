"""Linear and few-shot probes on cached features: accuracy against references, head independence."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from sslkit.errors import UserError
from sslkit.eval import fewshot_eval, fewshot_indices, train_linear_probes
from sslkit.eval.linear import fit_linear_heads

LRS = (0.01, 0.1, 1.0)


def gaussian_clusters(n: int, d: int, c: int, separation: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Isotropic unit Gaussians around class means; train and test halves of n samples each."""
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(c, d, generator=g), dim=1) * separation  # (C, D)
    labels = torch.randint(0, c, (2 * n,), generator=g)
    feats = means[labels] + torch.randn(2 * n, d, generator=g)  # (2n, D)
    return feats[:n], labels[:n], feats[n:], labels[n:]


def nearest_class_mean_accuracy(xtr: Tensor, ytr: Tensor, xte: Tensor, yte: Tensor, c: int) -> float:
    """Bayes-optimal up to estimation error for equal isotropic Gaussians with equal priors."""
    means = torch.stack([xtr[ytr == k].mean(0) for k in range(c)])  # (C, D)
    return (torch.cdist(xte, means).argmin(1) == yte).float().mean().item()


@pytest.mark.parametrize("separation", [12.0, 3.0])  # far apart; overlapping
def test_gaussian_clusters_match_nearest_class_mean(separation: float) -> None:
    xtr, ytr, xte, yte = gaussian_clusters(2000, 16, 10, separation, seed=0)
    result = train_linear_probes(xtr, ytr, xte, yte, 10, lrs=LRS, epochs=20, batch_size=128)
    reference = nearest_class_mean_accuracy(xtr, ytr, xte, yte, 10)
    assert reference < 1.0 or separation > 10  # the overlapping case is not trivially separable
    assert result["top1"] == pytest.approx(reference, abs=0.02)
    assert result["top5"] >= result["top1"]
    if separation > 10:
        assert result["top1"] == 1.0


def linear_map_labels(n: int, d: int, c: int, seed: int) -> tuple[Tensor, Tensor]:
    """2n Gaussian features labelled by argmax(x @ A) for a random A: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, c, generator=g)
    x = torch.randn(2 * n, d, generator=g)
    return x, (x @ a).argmax(1)


def test_linear_map_labels_beat_least_squares() -> None:
    """Softmax regression should beat regressing one-hot targets on argmax(x @ A) labels."""
    n, c = 2000, 5
    x, y = linear_map_labels(n, 16, c, seed=1)
    result = train_linear_probes(x[:n], y[:n], x[n:], y[n:], c, lrs=LRS, epochs=30, batch_size=128)
    ones = torch.ones(2 * n, 1)
    w = torch.linalg.lstsq(torch.cat([x[:n], ones[:n]], 1), F.one_hot(y[:n], c).float()).solution  # (D+1, C)
    least_squares = ((torch.cat([x[n:], ones[n:]], 1) @ w).argmax(1) == y[n:]).float().mean().item()
    assert result["top1"] >= 0.95
    assert result["top1"] > least_squares
    assert result["top5"] == 1.0  # C = 5: top-5 covers every class


def test_random_labels_stay_at_chance() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4000, 32, generator=g)
    y = torch.randint(0, 10, (4000,), generator=g)
    result = train_linear_probes(x[:2000], y[:2000], x[2000:], y[2000:], 10, lrs=LRS, epochs=20, batch_size=128)
    for scores in result["per_lr"].values():  # binomial std of one head: sqrt(0.09 / 2000) = 0.007
        assert abs(scores["top1"] - 0.1) < 0.04
        assert abs(scores["top5"] - 0.5) < 0.06


def test_best_lr_is_argmax_of_per_lr() -> None:
    n = 1000
    x, y = linear_map_labels(n, 16, 5, seed=3)
    lrs = (0.003, 1.0, 0.03, 0.3)  # unsorted, so neither the first nor the last lr is the answer by order
    result = train_linear_probes(x[:n], y[:n], x[n:], y[n:], 5, lrs=lrs, epochs=10, batch_size=64)
    assert list(result["per_lr"]) == list(lrs)
    top1s = [result["per_lr"][lr]["top1"] for lr in lrs]
    assert len(set(top1s)) == len(lrs)  # no ties: the argmax is unique
    assert result["best_lr"] == lrs[top1s.index(max(top1s))]
    assert result["top1"] == max(top1s)
    assert result["top5"] == result["per_lr"][result["best_lr"]]["top5"]


def sgd_reference(x: Tensor, y: Tensor, c: int, lr: float, epochs: int, batch_size: int, wd: float,
                  seed: int) -> tuple[Tensor, Tensor]:
    """One head, autograd + torch.optim.SGD, the documented schedule and shuffle."""
    w = torch.zeros(x.shape[1], c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    opt = torch.optim.SGD([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}],
                          lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        for idx in torch.randperm(x.shape[0], generator=g).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(x[idx] @ w + b, y[idx]).backward()
            opt.step()
    return w.detach(), b.detach()


def test_heads_are_independent_and_match_torch_sgd() -> None:
    xtr, ytr, xte, yte = gaussian_clusters(500, 8, 4, 2.0, seed=4)  # 500 = 7 * 64 + 52: a ragged last batch
    kwargs = dict(epochs=6, batch_size=64, weight_decay=1e-3, seed=7)
    weight, bias = fit_linear_heads(xtr, ytr, 4, lrs=LRS, **kwargs)  # (L, D, C), (L, C)
    assert weight.shape == (3, 8, 4) and bias.shape == (3, 4)
    for i, lr in enumerate(LRS):
        alone_w, alone_b = fit_linear_heads(xtr, ytr, 4, lrs=(lr,), **kwargs)
        torch.testing.assert_close(weight[i], alone_w[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(bias[i], alone_b[0], rtol=1e-4, atol=1e-6)
        ref_w, ref_b = sgd_reference(xtr, ytr, 4, lr, kwargs["epochs"], 64, 1e-3, seed=7)
        torch.testing.assert_close(weight[i], ref_w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bias[i], ref_b, rtol=1e-4, atol=1e-5)
    # the same through the public API: each lr's scores equal those of that lr trained alone
    together = train_linear_probes(xtr, ytr, xte, yte, 4, lrs=LRS, **kwargs)["per_lr"]
    for lr in LRS:
        alone = train_linear_probes(xtr, ytr, xte, yte, 4, lrs=(lr,), **kwargs)["per_lr"][lr]
        assert together[lr] == pytest.approx(alone, abs=1 / 500)


def test_standardisation_is_invariant_to_feature_scale_and_dead_units() -> None:
    xtr, ytr, xte, yte = gaussian_clusters(800, 8, 5, 2.5, seed=5)
    base = train_linear_probes(xtr, ytr, xte, yte, 5, lrs=LRS, epochs=5)
    g = torch.Generator().manual_seed(6)
    scale = 10 ** (torch.rand(8, generator=g) * 6 - 3)  # 1e-3 .. 1e3 per dimension
    shift = torch.randn(8, generator=g) * 100
    dead_tr = torch.full((800, 1), 3.0)  # a unit constant on the train split but not on the test split
    dead_te = torch.randn(800, 1, generator=g) * 50
    moved = train_linear_probes(torch.cat([xtr * scale + shift, dead_tr], 1), ytr,
                                torch.cat([xte * scale + shift, dead_te], 1), yte, 5, lrs=LRS, epochs=5)
    for lr in LRS:
        assert moved["per_lr"][lr] == pytest.approx(base["per_lr"][lr], abs=2 / 800)
    unnormalised = train_linear_probes(xtr * scale + shift, ytr, xte * scale + shift, yte, 5, lrs=LRS, epochs=5,
                                       normalize=False)
    assert unnormalised["top1"] < base["top1"] - 0.1  # so the check above is not vacuous


def test_fewshot_indices_balanced_and_seeded() -> None:
    g = torch.Generator().manual_seed(8)
    labels = torch.randint(0, 6, (300,), generator=g)
    idx = fewshot_indices(labels, 5, seed=0)
    assert idx.shape == (30,) and idx.unique().numel() == 30
    assert torch.equal(torch.bincount(labels[idx], minlength=6), torch.full((6,), 5))
    assert torch.equal(idx, fewshot_indices(labels, 5, seed=0))
    assert not torch.equal(idx, fewshot_indices(labels, 5, seed=1))


def test_fewshot_indices_errors_on_short_classes() -> None:
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 3)
    with pytest.raises(UserError, match="class 2 has 3 samples, fewer than the 4 asked for"):
        fewshot_indices(labels, 4, seed=0)
    with pytest.raises(UserError, match="class 3 has 0 samples"):  # absent, but num_classes says it exists
        fewshot_indices(labels, 1, seed=0, num_classes=4)


def test_fewshot_eval_runs_and_statistics() -> None:
    xtr, ytr, xte, yte = gaussian_clusters(1000, 16, 5, 6.0, seed=9)
    shots, seeds = (1, 4), (0, 1, 2)
    result = fewshot_eval(xtr, ytr, xte, yte, 5, shots=shots, seeds=seeds, val_per_class=10, lrs=LRS, epochs=50)
    assert list(result) == list(shots)
    for n in shots:
        runs = result[n]["runs"]
        assert [r["seed"] for r in runs] == list(seeds)
        top1s = [r["top1"] for r in runs]
        assert result[n]["mean_top1"] == pytest.approx(statistics.fmean(top1s))
        assert result[n]["std_top1"] == pytest.approx(statistics.stdev(top1s))
        assert all(r["lr"] in LRS and r["top5"] >= r["top1"] for r in runs)
    assert result[4]["mean_top1"] > 0.9  # well-separated clusters: a few shots suffice
    assert len({r["top1"] for r in result[1]["runs"]}) > 1  # different seeds draw different subsets
    single = fewshot_eval(xtr, ytr, xte, yte, 5, shots=(2,), seeds=(3,), lrs=(0.1,), epochs=20)
    assert len(single[2]["runs"]) == 1 and single[2]["std_top1"] == 0.0
