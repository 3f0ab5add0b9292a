"""Collapse monitors: closed-form effective ranks and stds, and when the monitor warns."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor

from sslkit.eval import CollapseMonitor, effective_rank, embedding_std


def centred_with_singular_values(s: list[float], b: int, d: int, seed: int = 0) -> Tensor:
    """(b, d) batch U diag(s) V^T whose columns already have zero mean, so centring keeps s."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, len(s), generator=g, dtype=torch.float64)
    u, _ = torch.linalg.qr(a - a.mean(dim=0))  # (b, r) orthonormal, orthogonal to the ones vector
    v, _ = torch.linalg.qr(torch.randn(d, len(s), generator=g, dtype=torch.float64))  # (d, r)
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.T


@pytest.mark.parametrize("r", [1, 2, 7, 32])
def test_effective_rank_of_rank_r_is_r(r: int) -> None:
    # r equal singular values: p uniform over r, exp(entropy) = r exactly
    z = centred_with_singular_values([3.0] * r, b=64, d=32)
    assert float(effective_rank(z)) == pytest.approx(r, rel=1e-4)


def test_effective_rank_unequal_singular_values() -> None:
    s = [4.0, 3.0, 2.0, 1.0]
    p = torch.tensor(s) / sum(s)
    expected = math.exp(-(p * p.log()).sum().item())
    z = centred_with_singular_values(s, b=50, d=20)
    assert float(effective_rank(z)) == pytest.approx(expected, rel=1e-4)


def test_effective_rank_orthogonal_and_random() -> None:
    # the identity's centred form I - 11^T/n has n - 1 unit singular values and one zero
    assert float(effective_rank(torch.eye(16))) == pytest.approx(15, rel=1e-4)
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(0)))
    assert float(effective_rank(q)) == pytest.approx(23, rel=1e-2)  # centring removes ~one direction
    gaussian = torch.randn(4096, 32, generator=torch.Generator().manual_seed(1))
    assert float(effective_rank(gaussian)) > 0.98 * 32  # near full, singular values ~equal
    assert float(effective_rank(gaussian.bfloat16())) == pytest.approx(float(effective_rank(gaussian)), rel=1e-2)


def test_constant_batch_is_fully_collapsed() -> None:
    z = torch.randn(1, 32).expand(64, 32)
    assert float(embedding_std(z)) == 0.0
    assert float(effective_rank(z)) == 0.0


def test_embedding_std_of_gaussian() -> None:
    d = 64
    z = torch.randn(8192, d, generator=torch.Generator().manual_seed(0)) * 5 + 0.01  # scale does not matter
    assert float(embedding_std(z)) == pytest.approx(1 / math.sqrt(d), rel=0.02)


def test_no_gradient_and_float32() -> None:
    z = torch.randn(32, 16, requires_grad=True).bfloat16()
    for value in (embedding_std(z), effective_rank(z)):
        assert value.dtype == torch.float32 and not value.requires_grad


def test_bad_shape() -> None:
    with pytest.raises(ValueError, match="B >= 2"):
        embedding_std(torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        effective_rank(torch.randn(8))


def test_monitor_values_and_healthy_batch_does_not_warn() -> None:
    z = torch.randn(512, 128, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = CollapseMonitor()(z)
    assert set(out) == {"emb_std", "emb_std_ratio", "eff_rank", "eff_rank_ratio"}
    assert out["emb_std_ratio"] == pytest.approx(out["emb_std"] * math.sqrt(128))
    assert out["emb_std_ratio"] == pytest.approx(1.0, rel=0.05)
    assert out["eff_rank_ratio"] == pytest.approx(out["eff_rank"] / 128)
    assert out["eff_rank_ratio"] > 0.8


def test_monitor_warns_on_collapse() -> None:
    with pytest.warns(RuntimeWarning) as record:
        out = CollapseMonitor()(torch.ones(256, 128))
    assert out["emb_std_ratio"] == 0.0 and out["eff_rank_ratio"] == 0.0
    messages = [str(w.message) for w in record]
    assert len(messages) == 2  # one per kind
    assert "Embedding collapse" in messages[0] and "Dimensional collapse" in messages[1]
    assert all("learning rate" in m and "temperature" in m and "augmentations" in m for m in messages)
    # dimensional collapse alone: varied embeddings along one direction (plus an offset)
    g = torch.Generator().manual_seed(0)
    line = torch.randn(256, 1, generator=g) * torch.randn(1, 128, generator=g) + torch.randn(1, 128, generator=g)
    with pytest.warns(RuntimeWarning, match="Dimensional collapse") as record:
        CollapseMonitor()(line)
    assert not any("Embedding collapse" in str(w.message) for w in record)


def test_monitor_warns_once_until_recovered() -> None:
    collapsed, healthy = torch.ones(64, 32), torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    monitor = CollapseMonitor(rank_ratio_warn=0.0)  # std warnings only
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for z in (collapsed, collapsed, healthy, collapsed):
            monitor(z)
    assert len(record) == 2  # the first collapse, and the one after recovering
