"""sslkit.distributed: one process without a process group; over gloo, 2 processes gather and
reduce as one process holding the whole batch, and the losses that gather step like it."""

from unittest import mock

import pytest
import torch
import torch.distributed as dist

import sslkit.distributed
from sslkit.distributed import all_reduce_mean, all_reduce_sum, gather, rank, world_size
from sslkit.losses import BarlowTwinsLoss, MoCoV3Loss, NTXentLoss, SwAVLoss, VICRegLoss, sinkhorn_knopp_teacher
from tests.conftest import run_gloo_workers

WORLD = 2
N, D = 3, 5  # rows per process, features

LOSSES = {
    "ntxent": lambda: NTXentLoss(temperature=0.5, gather_distributed=True),
    "barlowtwins": lambda: BarlowTwinsLoss(redundancy_weight=0.1, gather_distributed=True),
    "vicreg": lambda: VICRegLoss(gather_distributed=True),
    "mocov3": lambda: MoCoV3Loss(temperature=0.2, gather_distributed=True),
}


def _batch(seed: int = 0) -> torch.Tensor:
    """(WORLD * N, D) float64, rank-major: rows r * N : (r + 1) * N are rank r's."""
    return torch.randn(WORLD * N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _loss(gathered: torch.Tensor, r: int) -> torch.Tensor:
    """Process r's loss: it uses every row of the gathered batch, and differs per process."""
    weights = torch.randn(WORLD, D, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return torch.tanh(gathered @ weights[r]).pow(2).sum() * (r + 1)


def _gather_grad(r: int) -> dict:
    x = _batch()[r * N:(r + 1) * N].clone().requires_grad_()
    out = gather(x)
    _loss(out, r).backward()
    return {"out": out.detach(), "grad": x.grad}


def _work(r: int) -> dict:
    res = {"world_size": world_size(), "rank": rank(), "gather": _gather_grad(r)}
    # control: the same gather without its gradient all-reduce
    with mock.patch.object(sslkit.distributed, "all_reduce_sum", lambda t: t):
        res["no_reduce"] = _gather_grad(r)
    with torch.no_grad():
        res["no_grad"] = gather(_batch()[r * N:(r + 1) * N])
    t = torch.tensor([r + 1.0, 10.0 * (r + 1)])
    res["sum"], res["sum_in_place"] = all_reduce_sum(t), t
    res["mean"] = all_reduce_mean(torch.tensor([r + 1.0, 10.0 * (r + 1)]))
    for name, make in LOSSES.items():
        z0, z1 = (_batch(seed)[r * N:(r + 1) * N].float().requires_grad_() for seed in (2, 3))
        loss = make()(z0, z1)
        loss.backward()
        res[name] = {"loss": loss.detach(), "grad0": z0.grad, "grad1": z1.grad}
    res["bank"] = _bank_steps(lambda seed: _batch(seed)[r * N:(r + 1) * N])
    scores = [_batch(seed)[r * N:(r + 1) * N].float() for seed in (4, 5, 6)]  # 3 crops, D prototypes
    res["sinkhorn"] = sinkhorn_knopp_teacher(scores[0], 0.05, gather_distributed=True)
    res["swav"] = SwAVLoss(sinkhorn_gather_distributed=True)(scores[:2], scores[2:])
    return res


BANK_ROWS = 8  # the global batch (6 rows) does not divide it: the second step wraps around


def _bank_steps(batch) -> dict:
    """Two steps of NT-Xent with a gathered memory bank: the second step's loss and gradient
    (its negatives are the first step's keys and part of the initial bank), the final bank."""
    torch.manual_seed(4)  # the bank's random initial rows, the same in every process
    loss_fn = NTXentLoss(temperature=0.5, memory_bank_size=(BANK_ROWS, D), gather_distributed=True)
    for step in range(2):
        z0, z1 = batch(10 + step).float().requires_grad_(), batch(20 + step).float()
        loss = loss_fn(z0, z1)
        loss.backward()
    return {"loss": loss.detach(), "grad0": z0.grad, "bank": loss_fn.memory_bank.bank.clone(),
            "ptr": loss_fn.memory_bank.ptr.clone()}


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> list[dict]:
    """Both processes' results, run once for the module (process start-up dominates)."""
    return run_gloo_workers(_work, tmp_path_factory.mktemp("distributed"), WORLD)


def _reference_grad() -> torch.Tensor:
    """One process holding the whole batch: the gradient of the sum of every process's loss."""
    x = _batch().requires_grad_()
    sum(_loss(x, r) for r in range(WORLD)).backward()
    return x.grad


# --- one process ------------------------------------------------------------------------------


def test_one_process_without_a_process_group():
    assert not dist.is_initialized()
    assert (world_size(), rank()) == (1, 0)
    x = torch.randn(4, 3, requires_grad=True)
    assert gather(x) is x
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t) is t and all_reduce_mean(t) is t and t.tolist() == [1.0, 2.0]


def test_world_of_one_process():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert (world_size(), rank()) == (1, 0)
        x = torch.randn(4, 3)
        assert gather(x) is x
        assert all_reduce_mean(torch.tensor([3.0])).item() == 3.0
    finally:
        dist.destroy_process_group()


# --- two processes over gloo ----------------------------------------------------------------------


def test_two_processes(workers):
    assert [(w["world_size"], w["rank"]) for w in workers] == [(WORLD, 0), (WORLD, 1)]


def test_gather_forward_is_the_whole_batch_in_rank_order(workers):
    for w in workers:
        assert torch.equal(w["gather"]["out"], _batch())
        assert torch.equal(w["no_grad"], _batch())


def test_gather_backward_is_the_gradient_of_all_losses(workers):
    ref = _reference_grad()
    for r, w in enumerate(workers):
        torch.testing.assert_close(w["gather"]["grad"], ref[r * N:(r + 1) * N], rtol=1e-12, atol=1e-12)


def test_control_gather_without_the_gradient_all_reduce_differs(workers):
    """Each process would get only its own loss's gradient: the test above tells them apart."""
    ref = _reference_grad()
    for r, w in enumerate(workers):
        x = _batch().requires_grad_()
        _loss(x, r).backward()  # this process's loss only
        torch.testing.assert_close(w["no_reduce"]["grad"], x.grad[r * N:(r + 1) * N])
        assert (w["no_reduce"]["grad"] - ref[r * N:(r + 1) * N]).abs().max() > 0.1


def test_all_reduce_sum_and_mean(workers):
    for w in workers:
        assert w["sum"].tolist() == [3.0, 30.0] and w["sum_in_place"].tolist() == [3.0, 30.0]
        assert w["mean"].tolist() == [1.5, 15.0]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gathering_losses_equal_one_process(workers, name):
    """The mean of the processes' losses is the whole batch's loss, and the gradient w.r.t. a
    process's rows over the number of processes is the whole batch loss's (DDP's averaging)."""
    z0, z1 = (_batch(seed).float().requires_grad_() for seed in (2, 3))
    ref = LOSSES[name]()(z0, z1)
    ref.backward()
    torch.testing.assert_close(sum(w[name]["loss"] for w in workers) / WORLD, ref.detach())
    for r, w in enumerate(workers):
        rows = slice(r * N, (r + 1) * N)
        torch.testing.assert_close(w[name]["grad0"] / WORLD, z0.grad[rows])
        if name == "mocov3":  # the keys carry no gradient
            assert w[name]["grad1"] is None and z1.grad is None
        else:
            torch.testing.assert_close(w[name]["grad1"] / WORLD, z1.grad[rows])


def test_memory_bank_filled_from_every_process_equals_one_process(workers):
    """NT-Xent with a gathered bank: both processes hold the bank one process with the global
    batch holds, and their second step (negatives from the first) averages to its step."""
    ref = _bank_steps(_batch)
    assert int(ref["ptr"]) == 2 * WORLD * N % BANK_ROWS  # the second step wrapped around
    for w in workers:
        torch.testing.assert_close(w["bank"]["bank"], ref["bank"])
        assert torch.equal(w["bank"]["ptr"], ref["ptr"])
    # each process's loss is over its own anchors: the mean over processes is the whole batch's
    torch.testing.assert_close(sum(w["bank"]["loss"] for w in workers) / WORLD, ref["loss"])
    for r, w in enumerate(workers):
        torch.testing.assert_close(w["bank"]["grad0"] / WORLD, ref["grad0"][r * N:(r + 1) * N])


def test_sinkhorn_over_two_processes_equals_one(workers):
    """SwAV's codes with the Sinkhorn sums all-reduced: each process's rows of the codes one
    process computes over the whole batch; the loss averaged over processes is its loss."""
    whole = [_batch(seed).float() for seed in (4, 5, 6)]
    one = sinkhorn_knopp_teacher(whole[0], 0.05, gather_distributed=False)
    torch.testing.assert_close(torch.cat([w["sinkhorn"] for w in workers]), one)
    local = sinkhorn_knopp_teacher(whole[0][:N], 0.05, gather_distributed=False)  # control: one process's rows alone
    assert (local - one[:N]).abs().max() > 1e-3  # get other codes
    mean = sum(w["swav"] for w in workers) / WORLD
    torch.testing.assert_close(mean, SwAVLoss()(whole[:2], whole[2:]))
