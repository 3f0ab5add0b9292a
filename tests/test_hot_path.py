"""The training step's hot path: a non-finite step changes nothing, for every method and
optimiser, decided on the device; on CUDA, steps run without a single host-device sync."""

import copy

import pytest
import torch
from accelerate import Accelerator

from sslkit.augment import create_augment
from sslkit.config import load_config
from sslkit.engine import trainer
from sslkit.engine.optim import create_optimizer, supports_found_inf
from sslkit.engine.trainer import optimizer_step
from sslkit.methods import create_method
from tests.conftest import set_step
from tests.test_distributed import METHOD_ARGS
from tests.test_methods import TINY

OPTIMIZERS = ("sgd", "lars", "adamw")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _setup(method: str, optimizer: str, device: str, *extra: str):
    cfg = load_config(None, [*TINY, *METHOD_ARGS[method], f"optim.name={optimizer}",
                             "optim.lr=0.1", "optim.clip_grad_norm=3.0", *extra])
    accelerator = Accelerator(cpu=device == "cpu")
    torch.manual_seed(0)
    method_ = create_method(cfg, num_classes=10).to(accelerator.device)
    augment = create_augment(cfg.augment).to(accelerator.device)
    model, opt = accelerator.prepare(method_, create_optimizer(method_, cfg.optim, batch_size=16))
    images = torch.randint(0, 256, (16, 3, 24, 24), dtype=torch.uint8, device=accelerator.device)
    labels = torch.arange(16, device=accelerator.device) % 10
    generator = torch.Generator(device=accelerator.device).manual_seed(0)
    method_.generator = generator
    set_step(method_, 0, steps_per_epoch=10, total_steps=100)  # the schedules' values, as the engine gives them

    def step(poison: bool = False) -> torch.Tensor:
        out = model(augment(images, generator), labels)
        accelerator.backward(out["loss"] * (torch.nan if poison else 1.0))
        return optimizer_step(cfg, accelerator, model, method_, opt)

    return method_, opt, step


def _snapshot(method, optimizer) -> dict:
    return copy.deepcopy({"model": method.state_dict(), "optimizer": optimizer.state_dict()["state"]})


def _assert_same(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("skip_on", ["device", "host"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_a_nonfinite_step_changes_nothing(method, optimizer, skip_on, monkeypatch):
    """Parameters (the EMA teacher's too) and optimiser state stay bitwise as they were
    (tests/test_optim.py covers a skip at the very first step). Buffers are not compared:
    BatchNorm statistics and DINO's centre follow the forward pass, not the step. ``device``
    takes the accelerator's path (``found_inf``, EMA scaled by 0) on the CPU."""
    if skip_on == "device":
        monkeypatch.setattr(trainer, "skips_on_device", lambda optimizer, flag: supports_found_inf(optimizer))
    method_, opt, step = _setup(method, optimizer, "cpu")
    step()  # the optimiser state exists
    before = _snapshot(method_, opt)
    assert step(poison=True).item() == 1.0
    after = _snapshot(method_, opt)
    params = [name for name, _ in method_.named_parameters()]
    _assert_same({k: before["model"][k] for k in params}, {k: after["model"][k] for k in params})
    _assert_same(before["optimizer"], after["optimizer"])
    assert step().item() == 0.0  # the next step applies
    assert any(not torch.equal(before["model"][name], p) for name, p in method_.named_parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_steps_need_no_host_sync(method, optimizer, device):
    """Views, forward, backward, clipping, the non-finite check, the optimiser and the EMA
    update: on CUDA, torch raises on any synchronising call (e.g. .item(), boolean masks)."""
    method_, opt, step = _setup(method, optimizer, device)
    step()  # warm-up: constants move to the device once
    strict = device == "cuda"
    if strict:
        torch.cuda.set_sync_debug_mode("error")
    try:
        flags = [step(), step(poison=True), step()]
    finally:
        if strict:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.stack(flags).tolist() == [0.0, 1.0, 0.0]
    assert all(torch.isfinite(p).all() for p in method_.parameters())
