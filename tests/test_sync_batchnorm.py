"""SyncBatchNorm: BatchNorm itself in one process; over gloo, 2 processes x B step like 1 x 2B."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sslkit.models.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from tests.conftest import run_gloo_workers

WORLD = 2
STEPS = 2  # the second step uses weights and running statistics the first one updated


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial affine parameters and running statistics for every BatchNorm."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return module


def _net() -> nn.Module:
    torch.manual_seed(0)
    return _randomise(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 5), nn.BatchNorm1d(5, momentum=None),  # None: cumulative average
    ), seed=1)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Per step: a batch of 8 images and regression targets. Each image has its own colour
    offset, so pooled features vary between images (well conditioned in float32)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(STEPS, 8, 3, 6, 6, generator=gen) + torch.randn(STEPS, 8, 3, 1, 1, generator=gen) + 1
    return x, torch.randn(STEPS, 8, 5, generator=gen)


def _train(model: nn.Module, params, xs, ys) -> dict:
    """STEPS of SGD with a mean-squared error; the last step's output and gradients, the final state."""
    opt = torch.optim.SGD(params, lr=0.5)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        out = model(x)
        F.mse_loss(out, y).backward()
        grads = {n.removeprefix("module."): p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    state = {k.removeprefix("module."): v.clone() for k, v in model.state_dict().items()}
    return {"out": out.detach(), "grads": grads, "state": state}


# Unequal splits of one batch over the 2 processes, for the forward statistics and the gradients.
SPLITS = [((8, 4, 5, 5), 3), ((8, 4, 5, 5), 0), ((8, 4), 3)]  # (global shape, rank 0's share)


def _split_batch(shape, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * 2 + 1, torch.randn(shape, generator=gen)


def _bn_loss(bn: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict:
    """A sum (not a mean) over samples: the global loss is the sum of the processes' losses."""
    x = x.clone().requires_grad_()
    out = bn(x)
    (out * g).sum().backward()
    return {"out": out.detach(), "x_grad": x.grad, "w_grad": bn.weight.grad, "b_grad": bn.bias.grad,
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone()}


def _work(rank: int) -> dict:
    xs, ys = _data()
    half = slice(rank * 4, rank * 4 + 4)
    res = {"world_size": dist.get_world_size()}
    for name, convert in [("sync", True), ("plain", False)]:
        net = convert_sync_batchnorm(_net()) if convert else _net()
        ddp = DDP(net)
        res[name] = _train(ddp, ddp.parameters(), xs[:, half], ys[:, half])
    for shape, first in SPLITS:
        x, g = _split_batch(shape)
        part = slice(0, first) if rank == 0 else slice(first, shape[0])
        res[shape, first] = _bn_loss(_randomise(SyncBatchNorm(shape[1]), seed=4), x[part], g[part])
    # autocast: bf16 activations in, bf16 out, float32 statistics
    x = _split_batch((8, 4, 5, 5))[0].bfloat16()[rank * 4:rank * 4 + 4]
    bn = SyncBatchNorm(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bn(x)
    res["autocast"] = {"out": out, "running_mean": bn.running_mean, "running_var": bn.running_var}
    return res


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> list[dict]:
    """Run both workers once for the module (process start-up dominates), return their results."""
    return run_gloo_workers(_work, tmp_path_factory.mktemp("sync_bn"), WORLD)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _reference() -> dict:
    xs, ys = _data()
    net = _net()
    return _train(net, net.parameters(), xs, ys)


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# --- one process: exactly nn.BatchNorm ---------------------------------------------------------

BN_CASES = [
    (nn.BatchNorm1d, (6, 5), {}),
    (nn.BatchNorm1d, (6, 5, 7), {"momentum": None}),
    (nn.BatchNorm2d, (6, 5, 4, 3), {}),
    (nn.BatchNorm2d, (6, 5, 4, 3), {"affine": False}),
    (nn.BatchNorm2d, (6, 5, 4, 3), {"track_running_stats": False}),
    (nn.BatchNorm3d, (6, 5, 2, 3, 2), {"bias": False}),
]


@pytest.mark.parametrize(("cls", "shape", "kwargs"), BN_CASES)
def test_one_process_is_batchnorm(cls, shape, kwargs):
    ref = _randomise(cls(shape[1], **kwargs), seed=0)
    bn = convert_sync_batchnorm(copy.deepcopy(ref))
    assert type(bn) is SyncBatchNorm
    gen = torch.Generator().manual_seed(0)
    for train in (True, True, False):  # two training steps (momentum), then eval
        ref.train(train), bn.train(train)
        x = torch.randn(shape, generator=gen) * 3 + 2
        outs, grads = [], []
        for m in (ref, bn):
            xi = x.clone().requires_grad_()
            out = m(xi)
            (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
            outs.append(out)
            grads.append([xi.grad] + [p.grad for p in m.parameters()])
        assert torch.equal(outs[0], outs[1])
        for a, b in zip(*grads):
            assert torch.equal(a, b)
        for (k, a), (kb, b) in zip(ref.state_dict().items(), bn.state_dict().items()):
            assert k == kb and torch.equal(a, b)


def test_world_of_one_process_is_batchnorm():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ref = _randomise(nn.BatchNorm2d(4), seed=0)
        bn = convert_sync_batchnorm(copy.deepcopy(ref))
        x = torch.randn(6, 4, 3, 3)
        assert torch.equal(bn(x), ref(x))
        assert torch.equal(bn.running_var, ref.running_var)
    finally:
        dist.destroy_process_group()


def test_convert_keeps_parameters_buffers_and_flags():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                          nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6, affine=False)))
    model[2][2].eval()
    model[1].weight.requires_grad_(False)  # e.g. a frozen EMA copy
    params = dict(model.named_parameters())
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    mean = model[1].running_mean

    out = convert_sync_batchnorm(model)
    assert out is model
    assert type(model[1]) is SyncBatchNorm and type(model[2][2]) is SyncBatchNorm
    assert model[1].training and not model[2][2].training
    assert all(params[n] is p for n, p in model.named_parameters())  # same objects: optimisers keep them
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad
    assert model[1].running_mean is mean
    state = model.state_dict()
    assert state.keys() == buffers.keys() and all(torch.equal(state[k], buffers[k]) for k in state)
    assert all(t.device.type == "cpu" for t in state.values())  # nothing left on "meta"

    # a BatchNorm as the root: a new module; converting again changes nothing
    root = nn.BatchNorm1d(3)
    new = convert_sync_batchnorm(root)
    assert type(new) is SyncBatchNorm and new.weight is root.weight and new.bias is root.bias
    assert convert_sync_batchnorm(new) is new


def test_rejects_1d_input():
    with pytest.raises(ValueError, match="2D"):
        SyncBatchNorm(3)(torch.randn(3))


# --- two processes over gloo ----------------------------------------------------------------------


def test_two_processes_step_like_one(workers):
    assert [w["world_size"] for w in workers] == [WORLD, WORLD]
    ref = _reference()
    for rank, w in enumerate(workers):
        got = w["sync"]
        _close(got["out"], ref["out"][rank * 4:rank * 4 + 4])
        assert got["grads"].keys() == ref["grads"].keys()
        for k in ref["grads"]:
            _close(got["grads"][k], ref["grads"][k])
        assert got["state"].keys() == ref["state"].keys()
        for k in ref["state"]:  # parameters after the steps, running statistics, num_batches_tracked
            _close(got["state"][k], ref["state"][k])
    assert ref["state"]["6.num_batches_tracked"] == STEPS


def test_control_plain_batchnorm_differs(workers):
    """Per-process statistics: the comparison above would fail without synchronisation."""
    ref = _reference()
    plain = workers[0]["plain"]
    assert _max_diff(plain["grads"], ref["grads"]) > 1e-2
    assert _max_diff(plain["state"], ref["state"]) > 1e-2
    assert _max_diff(workers[0]["sync"]["grads"], ref["grads"]) < 1e-5


@pytest.mark.parametrize(("shape", "first"), SPLITS)
def test_unequal_batch_sizes(workers, shape, first):
    x, g = _split_batch(shape)
    ref = _bn_loss(_randomise(nn.BatchNorm2d(shape[1]) if len(shape) == 4 else nn.BatchNorm1d(shape[1]), seed=4),
                   x, g)
    got = [w[shape, first] for w in workers]
    assert [r["out"].shape[0] for r in got] == [first, shape[0] - first]
    _close(torch.cat([r["out"] for r in got]), ref["out"])
    _close(torch.cat([r["x_grad"] for r in got]), ref["x_grad"])
    # summed losses: the processes' parameter gradients add up to the whole batch's
    _close(got[0]["w_grad"] + got[1]["w_grad"], ref["w_grad"])
    _close(got[0]["b_grad"] + got[1]["b_grad"], ref["b_grad"])
    for r in got:
        _close(r["running_mean"], ref["running_mean"])
        _close(r["running_var"], ref["running_var"])


def test_autocast_bf16(workers):
    x = _split_batch((8, 4, 5, 5))[0].bfloat16().float()
    ref = nn.BatchNorm2d(4)
    ref_out = ref(x)
    got = [w["autocast"] for w in workers]
    assert all(r["out"].dtype == torch.bfloat16 and r["running_var"].dtype == torch.float32 for r in got)
    for r in got:  # statistics of the bf16 values, computed in float32
        _close(r["running_mean"], ref.running_mean)
        _close(r["running_var"], ref.running_var)
    # the output is the float32 result rounded once to bf16
    _close(torch.cat([r["out"] for r in got]).float(), ref_out.bfloat16().float(), tol=1e-2)
