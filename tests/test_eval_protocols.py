"""Probes beyond the plain linear one: label fractions, k-NN + linear, RankMe, a scikit-learn reference."""

import json
import math

import pytest
import torch

from sslkit.errors import UserError
from sslkit.eval.fewshot import balanced_indices, fraction_linear_eval
from sslkit.eval.knn import knn_accuracy, knn_scores
from sslkit.eval.knn_linear import interpolate, knn_linear_eval, knn_probabilities
from sslkit.eval.linear import heads_accuracy, fit_linear_heads, standardize, train_linear_probes
from sslkit.eval.monitors import effective_rank, rankme
from tests.conftest import run_sslkit_here


def _blobs(n: int, d: int = 16, c: int = 5, noise: float = 2.0, seed: int = 0):
    """(n, d) Gaussian blobs around c random centres (the same for every seed): separable only in part."""
    centres = torch.randn(c, d, generator=torch.Generator().manual_seed(123)) * 2
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % c
    return centres[labels] + noise * torch.randn(n, d, generator=g), labels


def test_balanced_indices_take_the_fraction_of_every_class_reproducibly():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([100, 250, 40])])  # uneven classes
    idx = balanced_indices(labels, 0.1, seed=3)
    assert torch.bincount(labels[idx]).tolist() == [10, 25, 4]
    assert torch.equal(idx, balanced_indices(labels, 0.1, seed=3))  # reproducible
    assert not torch.equal(idx, balanced_indices(labels, 0.1, seed=4))  # another seed, another draw
    assert len(set(idx.tolist())) == idx.numel() and torch.equal(idx, idx.sort().values)
    small = balanced_indices(labels, 0.01, seed=3)
    assert torch.bincount(labels[small]).tolist() == [1, 2, 1]  # at least one of each class
    assert set(small.tolist()) <= set(idx.tolist())  # nested: a prefix of the same permutation
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(UserError, match="label fraction .* out of range"):
            balanced_indices(labels, bad, seed=0)


def test_fraction_probes_match_a_probe_on_the_subset():
    x, y = _blobs(600)
    xt, yt = _blobs(200, seed=1)
    out = fraction_linear_eval(x, y, xt, yt, 5, fractions=(0.1,), seeds=(0, 1), lrs=(0.1,), epochs=20)[0.1]
    assert [r["images"] for r in out["runs"]] == [60, 60]
    # the same subset probed by hand, standardised with the whole train split
    xs, xts = standardize(x, x, xt)
    idx = balanced_indices(y, 0.1, 1, 5)
    ref = train_linear_probes(xs[idx], y[idx], xts, yt, 5, lrs=(0.1,), epochs=20, seed=1, normalize=False)
    assert out["runs"][1]["top1"] == ref["top1"]
    assert out["mean_top1"] == pytest.approx((out["runs"][0]["top1"] + ref["top1"]) / 2)
    assert out["std_top1"] == pytest.approx(abs(out["runs"][0]["top1"] - ref["top1"]) / math.sqrt(2))


def test_interpolation_is_knn_at_lambda_one_and_linear_at_zero():
    x, y = _blobs(500)
    xt, yt = _blobs(300, seed=1)
    knn_only = knn_linear_eval(x, y, xt, yt, 5, k=10, temperature=0.1, lrs=(0.01, 0.1), epochs=10, lambdas=(1.0,))
    # k-NN as `eval knn` computes it: raw features, the whole train split as the bank
    ref = knn_accuracy(knn_scores(xt, x, y, 5, k=10, temperature=0.1), yt)
    assert knn_only["top1"] == knn_only["knn_top1"] == pytest.approx(ref["knn_top1"])
    linear_only = knn_linear_eval(x, y, xt, yt, 5, k=10, temperature=0.1, lrs=(0.01, 0.1), epochs=10, lambdas=(0.0,))
    xs, xts = standardize(x, x, xt)
    w, b = fit_linear_heads(xs, y, 5, (linear_only["lr"],), 10)
    ref_top1 = float(heads_accuracy(w, b, xts, yt)[0][0])
    assert linear_only["top1"] == linear_only["linear_top1"] == pytest.approx(ref_top1)
    p = knn_probabilities(xt, x, y, 5, 10, 0.1)
    assert torch.allclose(p.sum(1), torch.ones(300))
    assert torch.equal(interpolate(p, torch.zeros_like(p), 1.0), p)


def test_lambda_is_chosen_without_the_test_labels():
    x, y = _blobs(500)
    xt, yt = _blobs(300, seed=1)
    a = knn_linear_eval(x, y, xt, yt, 5, k=10, lrs=(0.1,), epochs=10)
    b = knn_linear_eval(x, y, xt, yt[torch.randperm(300, generator=torch.Generator().manual_seed(0))], 5, k=10,
                        lrs=(0.1,), epochs=10)
    assert (a["lambda"], a["val_top1"]) == (b["lambda"], b["val_top1"])
    assert a["top1"] != b["top1"]  # the test labels do change the reported accuracy


def test_linear_probe_close_to_scikit_learn_logistic_regression():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs(1500, d=24, c=6, noise=5.0)
    xt, yt = _blobs(1000, d=24, c=6, noise=5.0, seed=1)
    ours = train_linear_probes(x, y, xt, yt, 6, lrs=(0.03, 0.1, 0.3), epochs=60)["top1"]
    xs, xts = standardize(x, x, xt)
    ref = sklearn.LogisticRegression(max_iter=2000).fit(xs.numpy(), y.numpy()).score(xts.numpy(), yt.numpy())
    assert 0.3 < ref < 0.95  # a task where the probe matters
    assert ours == pytest.approx(ref, abs=0.02)


def test_rankme_is_the_entropy_rank_of_the_singular_values():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(50, 4, generator=g))  # (50, 4) orthonormal columns
    v, _ = torch.linalg.qr(torch.randn(8, 4, generator=g))  # (8, 4)
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    z = u @ torch.diag(s) @ v.T  # (50, 8), singular values s
    p = s / s.sum()
    assert rankme(z) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-4)
    # not centred: a batch far from the origin has one dominant direction; centred it does not
    shifted = z + 100.0
    assert rankme(shifted) < 1.5 < float(effective_rank(shifted))
    assert float(effective_rank(shifted)) == pytest.approx(float(effective_rank(z)), rel=0.05)


def test_eval_linear_with_knn_and_label_fractions_through_the_cli(tiny_run, tmp_path):
    out = tmp_path / "linear.json"
    done = run_sslkit_here("eval", "linear", "--checkpoint", str(tiny_run / "backbone.safetensors"),
                           "--with-knn", "--label-fraction", "0.1", "0.5", "--seeds", "0", "1", "--epochs", "5",
                           "--output", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert {"lambda", "knn_top1", "linear_top1", "top1"} <= set(result["knn_linear"])
    assert list(result["label_fractions"]) == ["0.1", "0.5"]
    assert [r["seed"] for r in result["label_fractions"]["0.1"]["runs"]] == [0, 1]
    assert "k-NN+linear" in done.stdout and "0.1 of labels" in done.stdout
    knn = tmp_path / "knn.json"
    assert run_sslkit_here("eval", "knn", "--checkpoint", str(tiny_run / "backbone.safetensors"),
                           "--output", str(knn)).returncode == 0
    for key in ("knn_top1", "knn_top5"):
        assert result["knn_linear"][key] == pytest.approx(json.loads(knn.read_text())[key])
    bad = run_sslkit_here("eval", "linear", "--checkpoint", str(tiny_run / "backbone.safetensors"),
                          "--label-fraction", "2", "--output", str(out))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "label fraction 2 is out of range" in bad.stderr
