import math

import pytest
import torch

from sslkit.config import OptimConfig
from sslkit.engine.optim import create_optimizer, create_scheduler, scaled_lr, warmup_cosine


def test_linear_scaling_rule():
    assert scaled_lr(OptimConfig(lr=0.06, lr_batch_size=128), 512) == pytest.approx(0.24)
    assert scaled_lr(OptimConfig(lr=0.06, lr_batch_size=None), 512) == 0.06


def test_warmup_then_cosine():
    values = [warmup_cosine(s, 10, 110, 0.0) for s in range(110)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(values[:9], values[1:10]))  # rising warm-up
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # falling cosine
    assert values[60] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_optimizers_exclude_bias_and_norm_from_decay(name):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = create_optimizer(model, OptimConfig(name=name, weight_decay=0.1), batch_size=128)
    decayed, plain = opt.param_groups
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 4])]
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0
    sched = create_scheduler(opt, OptimConfig(warmup_epochs=1), steps_per_epoch=4, total_steps=8)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.06 / 4)  # first warm-up step
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.06 * 2 / 4)


def test_extra_group_keeps_its_own_lr_and_no_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    probe = model[1]
    opt = create_optimizer(model, OptimConfig(weight_decay=0.1), 128,
                           [{"params": list(probe.parameters()), "lr": 0.5, "weight_decay": 0.0}])
    decayed, plain, extra = opt.param_groups
    assert len(decayed["params"]) == 1 and len(plain["params"]) == 1  # the first layer only
    assert extra["lr"] == 0.5 and extra["weight_decay"] == 0.0 and decayed["lr"] == pytest.approx(0.06)


def test_unknown_optimizer():
    with pytest.raises(KeyError, match="did you mean 'lars'"):
        create_optimizer(torch.nn.Linear(2, 2), OptimConfig(name="lars2"), 128)
