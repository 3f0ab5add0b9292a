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


# ---------------------------------------------------------------- NT-Xent with a memory bank


def _bank_losses(loss_fn, steps: int = 5, n: int = 8, d: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [loss_fn(torch.randn(n, d, generator=g).requires_grad_(), torch.randn(n, d, generator=g))
            for _ in range(steps)]


def test_ntxent_memory_bank_equals_lightly():
    """MoCo's form: the same losses and the same bank as lightly's, step after step, when the
    batch divides the bank (32 rows, batch 8: the fifth step wraps around)."""
    ours, theirs = NTXentLoss(0.2, memory_bank_size=(32, 8)), lightly.loss.NTXentLoss(0.2, memory_bank_size=(32, 8))
    theirs.memory_bank.bank.copy_(ours.memory_bank.bank)  # the same random start
    for a, b in zip(_bank_losses(ours), _bank_losses(theirs)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank)


def test_ntxent_memory_bank_formula_and_evaluation_keeps_it():
    """The loss is -log softmax of the positive among [positive, bank rows] (the bank as it was
    before the call); a call whose anchors need no gradient (evaluation) leaves the bank alone."""
    loss_fn = NTXentLoss(0.5, memory_bank_size=(6, 4))
    before = loss_fn.memory_bank.bank.clone()
    q, k = torch.randn(3, 4), torch.randn(3, 4)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ before.T], 1) / 0.5
    torch.testing.assert_close(loss_fn(q, k), F.cross_entropy(logits, torch.zeros(3, dtype=torch.long)))
    assert torch.equal(loss_fn.memory_bank.bank, before)
    loss_fn(q.requires_grad_(), k)
    torch.testing.assert_close(loss_fn.memory_bank.bank[:3], kn)  # the keys, normalised, enqueued
    assert torch.equal(loss_fn.memory_bank.bank[3:], before[3:])


def test_memory_bank_is_saved_and_restored_with_the_loss():
    """The bank and its write position are state: a loss restored from another's state_dict
    continues exactly (also one whose dim comes from its first batch, lightly's bare size)."""
    trained = NTXentLoss(0.5, memory_bank_size=16)  # dim from the first batch
    _bank_losses(trained, steps=3, d=8)
    restored = NTXentLoss(0.5, memory_bank_size=16)
    restored.load_state_dict(trained.state_dict())
    assert int(restored.memory_bank.ptr) == 3 * 8 % 16
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(8, 8, generator=g).requires_grad_(), torch.randn(8, 8, generator=g)
    torch.testing.assert_close(restored(q, k), trained(q, k))
    torch.testing.assert_close(restored.memory_bank.bank, trained.memory_bank.bank)


@pytest.mark.parametrize("size", [-1, (4, 0), (4, 8, 2)])
def test_memory_bank_bad_size_is_one_line(size):
    with pytest.raises(ValueError, match="MemoryBank"):
        NTXentLoss(memory_bank_size=size)
