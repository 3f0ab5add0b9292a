import lightly.loss
import pytest
import torch

from sslkit.config import Config, ConfigError, ModelConfig, load_config
from sslkit.errors import UserError
from sslkit.methods import METHODS, create_method
from sslkit.models import TinyCNN, create_backbone


def test_small_stem_keeps_resolution():
    plain = create_backbone(ModelConfig(backbone="resnet18"))
    small = create_backbone(ModelConfig(backbone="resnet18", small_stem=True))
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    # The stem's downsampling by 4 is gone: the last feature map is 4x4 instead of 1x1.
    assert small.forward_features(x).shape[-1] == 4 * plain.forward_features(x).shape[-1]
    assert small(x).shape == (2, 512)


def test_small_stem_on_non_resnet_is_a_clear_error():
    with pytest.raises(UserError, match="ResNet-style"):
        create_backbone(ModelConfig(backbone="tiny_cnn", small_stem=True))


def test_unknown_backbone():
    with pytest.raises(ConfigError, match="model.backbone='resnet1': unknown backbone .did you mean 'resnet18'"):
        load_config(None, ["model.backbone=resnet1"])


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_tiny_cnn(norm):
    model = TinyCNN(width=8, norm=norm)
    assert model(torch.randn(3, 3, 28, 28)).shape == (3, model.num_features) == (3, 64)


def test_method_registry_and_simclr_step():
    assert "simclr" in METHODS
    cfg = Config()
    cfg.model.backbone, cfg.model.width = "tiny_cnn", 8
    cfg.method.proj_hidden_dim, cfg.method.proj_output_dim = 32, 16
    cfg.method.temperature = 0.3  # not the default: a temperature that is not passed on fails below
    method = create_method(cfg)
    assert method.online_probe is None
    x0, x1 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    out = method([x0, x1])
    out["loss"].backward()
    # lightly's NT-Xent on the projections of the two views (one BatchNorm pass over both, as the
    # step): a wrong loss, temperature, head or pairing of views fails.
    with torch.no_grad():
        h = method.backbone(torch.cat([x0, x1]))
        z0, z1 = method.projection_head(h).chunk(2)
    torch.testing.assert_close(out["loss"].detach(), lightly.loss.NTXentLoss(temperature=0.3)(z0, z1))
    torch.testing.assert_close(out["features"], h[:4])  # the first view's backbone features
    assert not out["features"].requires_grad
    assert method.backbone.features[0].weight.grad is not None


def test_online_probe_trains_without_touching_the_backbone():
    cfg = Config()
    cfg.model.backbone, cfg.model.width = "tiny_cnn", 8
    cfg.method.proj_hidden_dim, cfg.method.proj_output_dim = 32, 16
    torch.manual_seed(0)
    method = create_method(cfg, num_classes=3)
    views = [torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)]
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with_probe = method(views, labels)
    # The probe's cross-entropy reaches the probe only: backbone gradients are the SSL loss's.
    backbone_grads = torch.autograd.grad(with_probe["loss"], list(method.backbone.parameters()))
    ssl_only = torch.autograd.grad(method(views)["loss"], list(method.backbone.parameters()))
    for a, b in zip(backbone_grads, ssl_only):
        assert torch.allclose(a, b)
    probe_grad = torch.autograd.grad(method(views, labels)["loss"], method.online_probe.weight)[0]
    assert probe_grad.abs().sum() > 0
    # online_correct counts the probe's right answers on the first view: labels made from its own
    # predictions with two changed give exactly 4 (a mean or a count of the errors fails).
    method.eval()  # BatchNorm on running statistics: the first view alone gets the step's features
    with torch.no_grad():
        labels = method.online_probe(method.backbone(views[0])).argmax(1)
    labels[:2] = (labels[:2] + 1) % 3
    assert method(views, labels)["online_correct"].item() == 4
    # Adding the probe does not change how the method's own modules are initialised.
    torch.manual_seed(0)
    without = dict(create_method(cfg).named_parameters())
    torch.manual_seed(0)
    with_probe = dict(create_method(cfg, num_classes=3).named_parameters())
    assert with_probe.keys() - without.keys() == {"online_probe.weight", "online_probe.bias"}
    assert all(torch.equal(v, with_probe[k]) for k, v in without.items())
    with pytest.raises(UserError, match="did you mean 'simclr'"):
        METHODS.get("simclrr")
