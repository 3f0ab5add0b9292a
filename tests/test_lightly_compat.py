"""sslkit.losses as a drop-in for lightly.loss: every loss lightly also has, built with lightly's
arguments and called as lightly's is, against lightly's own class (installed: a dependency) on
the same inputs, over the argument grids lightly's own loss tests use. Where sslkit differs on
purpose (docs/from_lightly.md) the difference is asserted here."""

from __future__ import annotations

import inspect
from unittest import mock

import lightly.loss
import pytest
import torch
import torch.distributed as dist

import sslkit.losses

# sslkit's name: lightly's
LIGHTLY_NAMES = {
    "NTXentLoss": "NTXentLoss", "DINOLoss": "DINOLoss", "BarlowTwinsLoss": "BarlowTwinsLoss",
    "VICRegLoss": "VICRegLoss", "NegativeCosineSimilarity": "NegativeCosineSimilarity", "SwAVLoss": "SwaVLoss",
    "KoLeoLoss": "KoLeoLoss", "IBOTPatchLoss": "IBOTPatchLoss",
}
# each loss's flag that gathers over processes, by lightly's name for it
GATHER_FLAGS = {"NTXentLoss": "gather_distributed", "BarlowTwinsLoss": "gather_distributed",
                "VICRegLoss": "gather_distributed", "SwAVLoss": "sinkhorn_gather_distributed"}


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(LIGHTLY_NAMES))
def test_lightly_arguments_are_accepted_in_place(name):
    """Each lightly parameter of the constructor and of forward is ours too, at the same position
    with the same default (ours may have a default where lightly's has none), and lightly's
    spelling of the class name is importable too."""
    theirs, ours = getattr(lightly.loss, LIGHTLY_NAMES[name]), getattr(sslkit.losses, name)
    assert getattr(sslkit.losses, LIGHTLY_NAMES[name]) is ours
    for method in ("__init__", "forward"):
        want = list(inspect.signature(getattr(theirs, method)).parameters.values())
        have = list(inspect.signature(getattr(ours, method)).parameters.values())[:len(want)]
        assert [p.name for p in have] == [p.name for p in want], method
        for mine, reference in zip(have, want):
            if reference.default is not reference.empty:
                assert mine.default == reference.default, (method, reference.name)


@pytest.mark.parametrize("name", sorted(GATHER_FLAGS))
def test_gathering_without_torch_distributed_is_a_value_error(name):
    """As lightly's: asking to gather on a torch without torch.distributed raises ValueError
    (checking once), and is accepted where it exists."""
    loss = getattr(sslkit.losses, name)
    with mock.patch.object(dist, "is_available", return_value=False) as available:
        with pytest.raises(ValueError, match=name):
            loss(**{GATHER_FLAGS[name]: True})
        available.assert_called_once()
    with mock.patch.object(dist, "is_available", return_value=True) as available:
        loss(**{GATHER_FLAGS[name]: True})
        available.assert_called_once()


@pytest.mark.parametrize("n", [1, 2, 8])
@pytest.mark.parametrize("dim", [1, 16])
@pytest.mark.parametrize("temperature", [0.1, 1.0, -1.0])  # lightly allows a negative one
@pytest.mark.parametrize("gather", [False, True])  # one process: gathering changes nothing
def test_ntxent_equals_lightly(n, dim, temperature, gather):
    z0, z1 = _randn(n, dim), _randn(n, dim, seed=1)
    kwargs = {"temperature": temperature, "gather_distributed": gather}
    torch.testing.assert_close(sslkit.losses.NTXentLoss(**kwargs)(z0, z1), lightly.loss.NTXentLoss(**kwargs)(z0, z1))


@pytest.mark.parametrize("n", [1, 8, 16])
@pytest.mark.parametrize("rows", [1, 8, 15, 16, 17])
def test_ntxent_memory_bank_closed_form(n, rows):
    """lightly's own check: identical directions everywhere, so once the bank is full of them the
    loss is -log(1 / (rows + 1)); a bare number of rows takes its dim from the first batch."""
    z = torch.rand(n, 1).repeat(1, 2) * torch.tensor([1.0, 2.0])  # every row along (1, 2)
    loss_fn = sslkit.losses.NTXentLoss(temperature=0.5, memory_bank_size=rows)
    for _ in range(rows // n + 2):  # fill the bank over several steps
        loss = loss_fn(z.clone().requires_grad_(), z)
    torch.testing.assert_close(loss, torch.log(torch.tensor(rows + 1.0)))


@pytest.mark.parametrize("rows, n", [(32, 8), (64, 16), (16, 16)])
def test_ntxent_memory_bank_equals_lightly_step_by_step(rows, n):
    """MoCo's form, several steps, from the same random bank: the same losses and the same bank
    as lightly's where the batch divides the bank (where it does not, lightly drops a batch's
    rows past the bank's end and sslkit wraps them around: docs/from_lightly.md)."""
    ours = sslkit.losses.NTXentLoss(0.2, memory_bank_size=(rows, 8))
    theirs = lightly.loss.NTXentLoss(0.2, memory_bank_size=(rows, 8))
    theirs.memory_bank.bank.copy_(ours.memory_bank.bank)
    for step in range(2 * rows // n + 1):
        q, k = _randn(n, 8, seed=2 * step).requires_grad_(), _randn(n, 8, seed=2 * step + 1)
        torch.testing.assert_close(ours(q, k), theirs(q, k))
    torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank)


@pytest.mark.parametrize("warmup_teacher_temp", [0.01, 0.07])
@pytest.mark.parametrize("teacher_temp", [0.04, 0.07])
@pytest.mark.parametrize("warmup_teacher_temp_epochs", [0, 1, 10])
@pytest.mark.parametrize("epoch", [0, 1, 20])
def test_dino_warm_up_by_epoch_equals_lightly(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epoch):
    """lightly's warm-up arguments and its ``epoch=`` call; twice, so the centre matters too."""
    kwargs = {"output_dim": 16, "warmup_teacher_temp": warmup_teacher_temp, "teacher_temp": teacher_temp,
              "warmup_teacher_temp_epochs": warmup_teacher_temp_epochs}
    ours, theirs = sslkit.losses.DINOLoss(**kwargs), lightly.loss.DINOLoss(**kwargs)
    for call in range(2):
        teacher = [_randn(4, 16, seed=10 * call + v) for v in range(2)]
        student = [_randn(4, 16, seed=10 * call + v + 2) for v in range(4)]
        torch.testing.assert_close(ours(teacher, student, epoch=epoch), theirs(teacher, student, epoch=epoch))
        torch.testing.assert_close(ours.center, theirs.center)


@pytest.mark.parametrize("n_local", [0, 3])
@pytest.mark.parametrize("student_temp, center_momentum", [(0.1, 0.9), (0.2, 0.5)])
def test_dino_equals_lightly_with_gradients(n_local, student_temp, center_momentum):
    kwargs = {"output_dim": 8, "student_temp": student_temp, "center_momentum": center_momentum}
    ours, theirs = sslkit.losses.DINOLoss(**kwargs), lightly.loss.DINOLoss(**kwargs)
    teacher = [_randn(3, 8, seed=v) for v in range(2)]
    student = [_randn(3, 8, seed=v + 5).requires_grad_() for v in range(2 + n_local)]
    ours_loss, theirs_loss = ours(teacher, student, teacher_temp=0.05), theirs(teacher, student, teacher_temp=0.05)
    torch.testing.assert_close(ours_loss, theirs_loss)
    for a, b in zip(torch.autograd.grad(ours_loss, student), torch.autograd.grad(theirs_loss, student)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="at least two views"):
        ours([teacher[0]], [student[0]])


def test_dino_center_of_a_2d_input_is_per_prototype():
    """The one deliberate difference: lightly averages a 2-D (N, K) input over both dimensions
    into one number; sslkit averages the N rows per prototype, as DINO's update_center does."""
    x = _randn(5, 8)
    ours, theirs = sslkit.losses.DINOLoss(output_dim=8), lightly.loss.DINOLoss(output_dim=8)
    ours.update_center(x)
    theirs.update_center(x)
    torch.testing.assert_close(ours.center.flatten(), 0.1 * x.mean(0))
    torch.testing.assert_close(theirs.center.flatten(), 0.1 * x.mean().expand(8))


@pytest.mark.parametrize("lambda_param", [5e-3, 0.1])
def test_barlow_twins_equals_lightly(lambda_param):
    z0, z1 = _randn(32, 64), _randn(32, 64, seed=1)
    ours = sslkit.losses.BarlowTwinsLoss(lambda_param=lambda_param)
    # float32 rounding: sslkit sums the off-diagonal as all entries minus the diagonal
    torch.testing.assert_close(ours(z0, z1), lightly.loss.BarlowTwinsLoss(lambda_param=lambda_param)(z0, z1), rtol=1e-4,
                               atol=1e-5)
    assert sslkit.losses.BarlowTwinsLoss(redundancy_weight=lambda_param).lambda_param == lambda_param
    # affine invariant, as lightly's test has it
    torch.testing.assert_close(ours(z0, z0), ours(z0, 2 * z0 + 4), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 32), (8, 16), (2, 10, 32)])  # (2, 10, 32): VICRegL's local features
@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (3.0, 5.0, 0.5)])
def test_vicreg_equals_lightly(shape, weights):
    z0, z1 = _randn(*shape), _randn(*shape, seed=1)
    kwargs = dict(zip(("lambda_param", "mu_param", "nu_param"), weights))
    torch.testing.assert_close(sslkit.losses.VICRegLoss(**kwargs)(z0, z1), lightly.loss.VICRegLoss(**kwargs)(z0, z1))
    # sslkit's names of the same weights; two names with different values are refused
    renamed = sslkit.losses.VICRegLoss(**dict(zip(("sim_weight", "var_weight", "cov_weight"), weights)))
    torch.testing.assert_close(renamed(z0, z1), lightly.loss.VICRegLoss(**kwargs)(z0, z1))
    with pytest.raises(ValueError, match="one parameter"):
        sslkit.losses.VICRegLoss(lambda_param=3.0, sim_weight=4.0)


def test_vicreg_bad_input_is_a_value_error_where_lightly_asserts():
    """lightly's `assert` raises AssertionError (and vanishes under python -O); sslkit raises a
    ValueError that says what to pass."""
    with pytest.raises(ValueError, match="batch of at least 2"):
        sslkit.losses.VICRegLoss()(_randn(1, 8), _randn(1, 8))
    with pytest.raises(ValueError, match="one shape"):
        sslkit.losses.VICRegLoss()(_randn(2, 8), _randn(2, 4))
    with pytest.raises(AssertionError):
        lightly.loss.VICRegLoss()(_randn(2, 8), _randn(2, 4))


@pytest.mark.parametrize("n", [1, 5])
def test_negative_cosine_similarity_equals_lightly(n):
    x0, x1 = _randn(n, 32), _randn(n, 32, seed=1)
    for kwargs in ({}, {"dim": 0, "eps": 1e-4}):
        torch.testing.assert_close(sslkit.losses.NegativeCosineSimilarity(**kwargs)(x0, x1),
                                   lightly.loss.NegativeCosineSimilarity(**kwargs)(x0, x1))


@pytest.mark.parametrize("n_low_res", [0, 2, 5])
@pytest.mark.parametrize("sinkhorn_iterations", [0, 1, 3])
@pytest.mark.parametrize("queue", [False, True])
def test_swav_equals_lightly(n_low_res, sinkhorn_iterations, queue):
    high = [torch.nn.functional.normalize(_randn(16, 32, seed=v), dim=1) for v in range(2)]
    low = [torch.nn.functional.normalize(_randn(16, 32, seed=v + 2), dim=1) for v in range(n_low_res)]
    queued = [torch.nn.functional.normalize(_randn(48, 32, seed=v + 9), dim=1) for v in range(2)] if queue else None
    ours = sslkit.losses.SwaVLoss(sinkhorn_iterations=sinkhorn_iterations)(high, low, queued)
    theirs = lightly.loss.SwaVLoss(sinkhorn_iterations=sinkhorn_iterations)(high, low, queued)
    assert ours.shape == () and theirs.shape in ((), (1,))  # lightly's may be (1,); ours is a scalar
    torch.testing.assert_close(ours, theirs.reshape(()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p, eps", [(2, 1e-8), (1, 1e-6)])
def test_koleo_equals_lightly(p, eps):
    x = _randn(16, 8).requires_grad_()
    ours, theirs = sslkit.losses.KoLeoLoss(p=p, eps=eps)(x), lightly.loss.KoLeoLoss(p=p, eps=eps)(x)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours, x), torch.autograd.grad(theirs, x)):
        torch.testing.assert_close(a, b)


def test_ibot_patch_loss_equals_lightly():
    """lightly's own example (its value was computed with dinov2's code), then two more calls:
    the same losses; the centre (a tensor buffer here, lightly's Center module there) alike."""
    kwargs = {"output_dim": 2, "teacher_temp": 0.1, "student_temp": 0.2, "center_mode": "mean", "center_momentum": 0.9}
    ours, theirs = sslkit.losses.IBOTPatchLoss(**kwargs), lightly.loss.IBOTPatchLoss(**kwargs)
    teacher = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    student = torch.tensor([[0.7, 0.8], [0.9, 1.0], [1.1, 1.2]])
    mask = torch.tensor([[[True, False], [True, False]], [[False, False], [False, True]],
                         [[False, False], [False, False]]])
    assert ours(teacher, student, mask).item() == pytest.approx(0.4057, rel=1e-4)
    assert theirs(teacher, student, mask).item() == pytest.approx(0.4057, rel=1e-4)
    torch.testing.assert_close(ours.center.reshape(-1), theirs.center.value.reshape(-1))
    for seed in range(2):
        t, s = _randn(3, 2, seed=seed), _randn(3, 2, seed=seed + 7)
        torch.testing.assert_close(ours(t, s, mask), theirs(t, s, mask))
        torch.testing.assert_close(ours.center.reshape(-1), theirs.center.value.reshape(-1))
