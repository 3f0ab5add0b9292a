import copy
import math
from types import SimpleNamespace

import pytest
import torch
from lightly.utils.lars import LARS as LightlyLARS

from sslkit.config import ConfigError, load_config
from sslkit.engine.lars import LARS
from sslkit.engine.optim import (
    OPTIMIZERS,
    _zero_momentum_buffers,
    create_optimizer,
    optim_schedules,
    param_groups,
    scaled_lr,
    set_schedules,
    step_unless_found_inf,
    supports_found_inf,
)
from sslkit.schedules import at_step, cosine


def OptimConfig(name: str = "sgd", **keys):  # noqa: N802 - reads as the config class it builds
    """The config class of optimiser ``name`` with ``keys``."""
    return OPTIMIZERS.config(name)(name=name, **keys)


def test_linear_scaling_rule():
    assert scaled_lr(OptimConfig(lr=0.06, lr_batch_size=128), 512) == pytest.approx(0.24)
    assert scaled_lr(OptimConfig(lr=0.06, lr_batch_size=None), 512) == 0.06


def test_warmup_then_cosine():
    values = [cosine(s, 110, 1.0, 0.0, warmup_steps=10) for s in range(110)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(values[:9], values[1:10]))  # rising warm-up
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # falling cosine
    assert values[60] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine(110, 110, 1.0, 0.1, warmup_steps=10) == pytest.approx(0.1)


def test_weight_decay_schedule_is_dinos_cosine():
    """DINO's ``cosine_scheduler(0.04, 0.4, epochs, niter_per_ep)``, written out."""
    cfg = OptimConfig("adamw", lr=1e-3, lr_batch_size=None, weight_decay=0.04, weight_decay_end=0.4)
    wd = optim_schedules(cfg, batch_size=8, steps_per_epoch=10, total_steps=100)["weight_decay"]
    expected = [0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * s / 100)) for s in range(100)]
    assert wd.tolist() == pytest.approx(expected)
    constant = optim_schedules(OptimConfig(weight_decay=0.1), 8, 10, 100)["weight_decay"]
    assert (constant == 0.1).all()


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_optimizers_exclude_bias_and_norm_from_decay(name):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = create_optimizer(model, OptimConfig(name=name, weight_decay=0.1), batch_size=128)
    decayed, plain = opt.param_groups
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 4])]
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0
    schedules = optim_schedules(OptimConfig(name, warmup_epochs=1, weight_decay=0.1), 128, steps_per_epoch=4,
                                total_steps=8)
    set_schedules(opt, at_step(schedules, 0))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.06 / 4)  # first warm-up step
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    set_schedules(opt, at_step(schedules, 1))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.06 * 2 / 4)
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)  # the schedule leaves norms undecayed


def test_extra_group_keeps_its_own_lr_and_no_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    probe = model[1]
    opt = create_optimizer(model, OptimConfig(weight_decay=0.1), 128,
                           [{"params": list(probe.parameters()), "lr": 0.5, "weight_decay": 0.0}])
    decayed, plain, extra = opt.param_groups
    assert len(decayed["params"]) == 1 and len(plain["params"]) == 1  # the first layer only
    assert extra["lr"] == 0.5 and extra["weight_decay"] == 0.0 and decayed["lr"] == pytest.approx(0.06)
    # it follows the same schedule, in proportion, and is never decayed
    set_schedules(opt, {"lr": 0.03, "weight_decay": 0.2})
    assert (decayed["lr"], extra["lr"]) == (pytest.approx(0.03), pytest.approx(0.25))
    assert (decayed["weight_decay"], plain["weight_decay"], extra["weight_decay"]) == (0.2, 0.0, 0.0)


def test_unknown_optimizer():
    with pytest.raises(ConfigError, match="optim.name='lars2': unknown optimizer 'lars2' .did you mean 'lars'"):
        load_config(None, ["optim.name=lars2"])


def test_optimizers_own_their_keys():
    assert load_config(None, ["optim.name=adamw", "optim.betas=[0.9, 0.95]"]).optim.betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match="unknown config key 'optim.betas' of optimizer 'sgd'"):
        load_config(None, ["optim.betas=[0.9, 0.95]"])
    with pytest.raises(ConfigError, match=r"optim.betas\[1\]=1.5: expected less than 1"):
        load_config(None, ["optim.name=adamw", "optim.betas=[0.9, 1.5]"])


# --- sslkit's LARS against lightly's; skipping steps on the device (found_inf) -----------------------------------

LARS_VARIANTS = [
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.0),
    dict(momentum=0.9, dampening=0.1),
]


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    with torch.no_grad():
        net[2].weight.zero_()  # ||p|| == 0 at the first step: lightly leaves the gradient unscaled
    return net


def _groups(net: torch.nn.Module) -> list[dict]:
    """A decayed (trust-ratio scaled) group and a plain one."""
    return param_groups(net, weight_decay=0.1, exclude_bias_norm=True)


def _gradients(net: torch.nn.Module, steps: int, skip: int | None = None) -> list[list[torch.Tensor]]:
    """Random gradients per step; step ``skip``'s hold NaN and Inf; step 1 zeroes the first layer's
    weight gradient (||g|| == 0: lightly neither scales nor decays it)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=gen) for p in net.parameters()]
        if step == 1:
            grads[0].zero_()
        if step == skip:
            for g in grads:
                g.view(-1)[0], g.view(-1)[-1] = float("nan"), float("inf")
        out.append(grads)
    return out


def _step(opt: torch.optim.Optimizer, net: torch.nn.Module, grads: list[torch.Tensor], scale: float = 1.0,
          found_inf: float | torch.Tensor | None = None) -> None:
    """Sets ``grads * scale`` and steps, with ``grad_scale = scale`` unless 1 and ``found_inf`` unless None."""
    for p, g in zip(net.parameters(), grads):
        p.grad = g * scale
    if scale != 1.0:
        opt.grad_scale = torch.tensor(scale)
    if found_inf is None:
        opt.step()
    else:
        step_unless_found_inf(opt, torch.as_tensor(found_inf))
    if scale != 1.0:
        del opt.grad_scale


def _assert_same_run(net, opt, ref_net, ref_opt, exact: bool = False) -> None:
    """Same parameters and the same optimiser state (each parameter's tensors by key)."""
    tol = 0.0 if exact else 1e-6
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)
        assert opt.state[p].keys() == ref_opt.state[q].keys()
        for key, value in opt.state[p].items():
            torch.testing.assert_close(value, ref_opt.state[q][key], rtol=tol, atol=tol)


@pytest.mark.parametrize("kwargs", LARS_VARIANTS, ids=str)
def test_lars_matches_lightly(kwargs):
    net, ref_net = _net(), _net()
    opt = LARS(_groups(net), lr=0.5, trust_coefficient=0.01, **kwargs)
    ref = LightlyLARS(_groups(ref_net), lr=0.5, trust_coefficient=0.01, **kwargs)
    for grads in _gradients(net, 5):
        _step(opt, net, grads)
        _step(ref, ref_net, grads)
    _assert_same_run(net, opt, ref_net, ref)
    assert opt.state_dict()["param_groups"] == ref.state_dict()["param_groups"]  # checkpoints look alike
    assert not torch.equal(net[0].weight, _net()[0].weight)


@pytest.mark.parametrize("skip", [0, 1])
@pytest.mark.parametrize("kwargs", LARS_VARIANTS[:3], ids=str)
def test_lars_found_inf_skips_the_step(kwargs, skip):
    """[skip, normal, normal] (or [normal, skip, normal]) is lightly's [normal, normal]; the
    normal steps run with found_inf=0, the skipped one changes no parameter and no buffer."""
    net, ref_net = _net(), _net()
    opt = LARS(_groups(net), lr=0.5, **kwargs)
    ref = LightlyLARS(_groups(ref_net), lr=0.5, **kwargs)
    for step, grads in enumerate(_gradients(net, 3, skip=skip)):
        before = [t.clone() for t in [*net.parameters(), *(s["momentum_buffer"] for s in opt.state.values())]]
        _step(opt, net, grads, found_inf=float(step == skip))
        if step == skip:
            after = [*net.parameters(), *(s["momentum_buffer"] for s in opt.state.values())]
            assert all(torch.equal(a, b) for a, b in zip(before, after))
            if step == 0:  # the buffers a skipped first step creates: zeros, not garbage
                assert all(not s["momentum_buffer"].any() for s in opt.state.values())
        else:
            _step(ref, ref_net, grads)
    _assert_same_run(net, opt, ref_net, ref)


def test_lars_divides_gradients_by_grad_scale():
    net, ref_net = _net(), _net()
    opt = LARS(_groups(net), lr=0.5, momentum=0.9)
    ref = LightlyLARS(_groups(ref_net), lr=0.5, momentum=0.9)
    for scale, grads in zip([1024.0, 3.0, 65536.0], _gradients(net, 3)):
        _step(opt, net, grads, scale=scale)
        _step(ref, ref_net, grads)
        torch.testing.assert_close(net[0].bias.grad, grads[1])  # left unscaled, as torch's fused optimisers do
    _assert_same_run(net, opt, ref_net, ref)


def test_lars_under_grad_scaler():
    """torch.amp.GradScaler drives it (grad_scale and found_inf): an overflowing step is skipped."""
    net, ref_net = _net(), _net()
    opt = LARS(_groups(net), lr=0.5, momentum=0.9)
    ref = LightlyLARS(_groups(ref_net), lr=0.5, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(2))
    for step in range(4):
        overflow = float("inf") if step == 1 else 1.0
        opt.zero_grad()
        scaler.scale(net(x).square().mean() * overflow).backward()
        scaler.step(opt)
        scaler.update()
        if step != 1:
            ref.zero_grad()
            ref_net(x).square().mean().backward()
            ref.step()
    assert scaler.get_scale() == 2.0**9  # halved once, by the overflow
    _assert_same_run(net, opt, ref_net, ref)


def test_lars_state_dict_round_trip():
    """Load into a fresh optimiser (ours from lightly's checkpoint and back), continue: the same run."""
    net, ref_net = _net(), _net()
    opt = LARS(_groups(net), lr=0.5, momentum=0.9)
    ref = LightlyLARS(_groups(ref_net), lr=0.5, momentum=0.9)
    grads = _gradients(net, 4)
    for g in grads[:2]:
        _step(opt, net, g)
        _step(ref, ref_net, g)
    resumed_net, from_lightly_net = copy.deepcopy(net), copy.deepcopy(ref_net)
    resumed = LARS(_groups(resumed_net), lr=0.1)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    from_lightly = LARS(_groups(from_lightly_net), lr=0.1)
    from_lightly.load_state_dict(copy.deepcopy(ref.state_dict()))
    to_lightly_net = copy.deepcopy(net)
    to_lightly = LightlyLARS(_groups(to_lightly_net), lr=0.1)
    to_lightly.load_state_dict(copy.deepcopy(opt.state_dict()))
    for g in grads[2:]:
        for o, n in [(opt, net), (ref, ref_net), (resumed, resumed_net), (from_lightly, from_lightly_net),
                     (to_lightly, to_lightly_net)]:
            _step(o, n, g)
    _assert_same_run(resumed_net, resumed, net, opt, exact=True)
    _assert_same_run(from_lightly_net, from_lightly, ref_net, ref)
    _assert_same_run(to_lightly_net, to_lightly, ref_net, ref)


def test_lars_step_reads_nothing_back_on_the_host(monkeypatch):
    net = _net()
    opt = LARS(_groups(net), lr=0.5, momentum=0.9, nesterov=True)
    grads = _gradients(net, 3, skip=1)
    found_inf = [torch.tensor(float(step == 1)) for step in range(3)]

    def host_read(*args, **kwargs):
        raise AssertionError("host read of a tensor in LARS.step")

    for name in ["item", "tolist", "__bool__", "__float__", "__int__", "__index__"]:
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for g, f in zip(grads, found_inf):
        _step(opt, net, g, scale=2.0, found_inf=f)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_cuda_step_does_not_synchronise(name):
    net = _net().cuda()
    opt = create_optimizer(net, OptimConfig(name=name, weight_decay=0.1), 128)
    grads = [[g.cuda() for g in step] for step in _gradients(net, 3, skip=0)]
    found_inf = [torch.tensor(float(step == 0), device="cuda") for step in range(3)]
    for g, f in zip(grads, found_inf):
        for p, gp in zip(net.parameters(), g):
            p.grad = gp
        torch.cuda.set_sync_debug_mode("error")
        try:
            step_unless_found_inf(opt, f)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in net.parameters())


def _reference(name: str, groups: list[dict], opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """torch's plain (single-tensor, unfused) optimiser with ``opt``'s settings."""
    d = opt.defaults
    if name.startswith("sgd"):
        return torch.optim.SGD(groups, lr=d["lr"], momentum=d["momentum"], nesterov=d["nesterov"], foreach=False)
    return torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], foreach=False)


@pytest.mark.parametrize("skip", [0, 1])
@pytest.mark.parametrize("name", ["sgd", "sgd-nesterov", "adamw"])
def test_fused_optimizers_found_inf_skips_the_step(name, skip):
    """[skip, normal, normal] equals torch's plain [normal, normal], also when the very first step
    is skipped (fused SGD alone would then use uninitialised momentum buffers)."""
    net, ref_net = _net(), _net()
    if name == "sgd-nesterov":  # not in the registry: the same fix, checked with nesterov's update
        opt = torch.optim.SGD(_groups(net), lr=0.06, momentum=0.9, nesterov=True, fused=True)
        opt.register_step_pre_hook(_zero_momentum_buffers)
    else:
        opt = create_optimizer(net, OptimConfig(name=name, weight_decay=0.1), 128)
        assert opt.defaults["fused"]
    ref = _reference(name, _groups(ref_net), opt)
    for step, grads in enumerate(_gradients(net, 3, skip=skip)):
        _step(opt, net, grads, found_inf=float(step == skip))
        if step != skip:
            _step(ref, ref_net, grads)
    _assert_same_run(net, opt, ref_net, ref)


def test_supports_found_inf():
    net = _net()
    assert supports_found_inf(LARS(net.parameters(), lr=0.1))
    assert supports_found_inf(create_optimizer(net, OptimConfig(name="sgd"), 128))
    assert supports_found_inf(SimpleNamespace(optimizer=create_optimizer(net, OptimConfig(name="adamw"), 128)))
    plain = torch.optim.SGD(net.parameters(), lr=0.1)
    assert not supports_found_inf(plain)
    with pytest.raises(TypeError, match="cannot skip"):
        step_unless_found_inf(plain, torch.tensor(0.0))

    opt = LARS(net.parameters(), lr=0.1)
    wrapped = SimpleNamespace(optimizer=opt, step=opt.step)  # as accelerate's AcceleratedOptimizer
    net(torch.randn(4, 6)).square().sum().backward()
    before = net[2].weight.detach().clone()
    step_unless_found_inf(wrapped, torch.tensor(1.0))
    assert torch.equal(net[2].weight, before) and not hasattr(opt, "found_inf")
    step_unless_found_inf(wrapped, torch.tensor(0.0))
    assert not torch.equal(net[2].weight, before)
