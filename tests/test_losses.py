import lightly.loss
import pytest
import torch
import torch.nn.functional as F

from sslkit.losses import NTXentLoss


def ntxent_direct(z0: torch.Tensor, z1: torch.Tensor, t: float) -> torch.Tensor:
    """The SimCLR paper's formula, written out: 2N anchors, one positive each, 2N - 2 negatives."""
    z = F.normalize(torch.cat([z0, z1]), dim=1)  # (2N, D)
    n = z0.shape[0]
    losses = []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        sims = torch.stack([z[i] @ z[k] / t for k in range(2 * n) if k != i])
        positive = z[i] @ z[j] / t
        losses.append(-(positive - torch.logsumexp(sims, 0)))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_ntxent_equals_formula(t):
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    assert torch.allclose(NTXentLoss(temperature=t)(z0, z1), ntxent_direct(z0, z1, t), atol=1e-5)


def test_ntxent_gradients_match_formula():
    z0 = torch.randn(5, 4, requires_grad=True)
    z1 = torch.randn(5, 4, requires_grad=True)
    g_ours = torch.autograd.grad(NTXentLoss(0.3)(z0, z1), [z0, z1])
    g_ref = torch.autograd.grad(ntxent_direct(z0, z1, 0.3), [z0, z1])
    for a, b in zip(g_ours, g_ref):
        assert torch.allclose(a, b, atol=1e-5)


def test_ntxent_is_lightly_compatible():
    z0, z1 = torch.randn(8, 16), torch.randn(8, 16)
    assert torch.allclose(NTXentLoss(0.5)(z0, z1), lightly.loss.NTXentLoss(0.5)(z0, z1))
