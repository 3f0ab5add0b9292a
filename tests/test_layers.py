"""Per-layer probes and moment probing: features against independent paths, and the commands."""

import json

import pytest
import timm
import torch

from sslkit.eval.layers import LayerTaps, tapped_modules
from sslkit.eval.moments import MomentTaps, moment_features, positions, random_projection
from sslkit.models.backbones import TinyCNN
from tests.conftest import TINY_RECIPE, run_sslkit_here


def _vit() -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=4, depth=4,
                             embed_dim=32, num_heads=2, reg_tokens=2).eval()


def test_cnn_layers_equal_the_stages_run_by_hand():
    torch.manual_seed(0)
    model = TinyCNN(8).eval()
    taps = LayerTaps(model, tapped_modules(model))
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        cols = taps(x).split(taps.dims, 1)
        for i, col in enumerate(cols[:4]):  # each block's ReLU output, average-pooled
            assert torch.allclose(col, model.features[: 3 * i + 3](x).mean(dim=(2, 3)), atol=1e-6)
        assert torch.allclose(cols[4], model(x), atol=1e-6)
    assert taps.names == ["features.2", "features.5", "features.8", "features.11", "output"]
    assert not any(m._forward_hooks for m in model.modules())  # the caller's network is left as it was


def test_resnet_stages_equal_timms_intermediates():
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", num_classes=0).eval()
    names = tapped_modules(resnet)
    assert names == ["act1", "layer1", "layer2", "layer3", "layer4"]  # the stem and the four stages
    taps = LayerTaps(resnet, names)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cols = taps(x).split(taps.dims, 1)
        maps = resnet.forward_intermediates(x, intermediates_only=True)  # (B, C, h, w) per stage
    assert taps.dims == [64, 64, 128, 256, 512, 512]
    for col, fmap in zip(cols, maps):
        assert torch.allclose(col, fmap.mean(dim=(2, 3)), atol=1e-5)


def test_vit_layers_equal_timms_intermediates_and_every_thins_them():
    torch.manual_seed(0)
    vit = _vit()
    assert tapped_modules(vit, 3) == ["blocks.2", "blocks.3"]  # every 3rd and the last
    taps = LayerTaps(vit, tapped_modules(vit, 2))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        cols = taps(x).split(taps.dims, 1)
        inter = vit.forward_intermediates(x, indices=[1, 3], intermediates_only=True, output_fmt="NLC")
    for col, tokens in zip(cols, inter):  # (B, 16 patches, 32): prefix tokens already left out
        assert torch.allclose(col, tokens.mean(1), atol=1e-5)


def test_moment_features_equal_the_closed_forms():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 6)  # (B, P, C)
    diag = moment_features(x, "diag")
    mean = x.sum(1) / 10
    assert torch.allclose(diag, torch.cat([mean, (x * x).sum(1) / 10 - mean * mean], 1), atol=1e-5)
    proj = random_projection(6, 4)
    low = moment_features(x, "lowrank", proj)  # (B, 6 + 10)
    assert low.shape == (3, 6 + 10)
    for b in range(3):
        cov = torch.cov((x[b] @ proj).T, correction=0)  # (4, 4), torch's own covariance
        i, j = torch.triu_indices(4, 4)
        assert torch.allclose(low[b, 6:], cov[i, j], atol=1e-5)
    fmap = torch.randn(2, 6, 3, 4)  # (B, C, H, W): 12 positions of 6 channels
    assert torch.equal(positions(fmap)[1, 5], fmap[1, :, 1, 1])


def test_moment_taps_keep_the_networks_output_and_drop_vit_prefix_tokens():
    torch.manual_seed(0)
    vit = _vit()
    taps = MomentTaps(vit, ["diag"], rank=4)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out, diag = taps(x).split(taps.dims, 1)
        tokens = vit.forward_features(x)[:, vit.num_prefix_tokens:]  # (B, 16, 32): class + 2 registers dropped
        assert torch.allclose(out, vit(x), atol=1e-5)
        assert torch.allclose(diag[:, :32], tokens.mean(1), atol=1e-5)


def test_eval_layers_probes_every_stage_and_the_projection(tiny_run, tmp_path):
    from sslkit.engine.checkpoint import load_method

    out = tmp_path / "layers.json"
    done = run_sslkit_here("eval", "layers", "--checkpoint", str(tiny_run / "checkpoints" / "last"),
                           "--epochs", "5", "--output", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    names = [x["layer"] for x in result["layers"]]
    assert names == ["features.2", "features.5", "features.8", "features.11", "output", "projection"]
    assert result["layers"][-1]["dim"] == TINY_RECIPE["method"]["proj_output_dim"]
    assert all(0 <= x["linear_top1"] <= 1 and 0 <= x["knn_top1"] <= 1 for x in result["layers"])
    assert out.with_suffix(".png").stat().st_size > 0
    # the projection column is the method's own head on its backbone's output
    _, method = load_method(tiny_run / "checkpoints" / "last")
    method.eval()
    taps = LayerTaps(method.feature_model(), tapped_modules(method.feature_model()), method.feature_projection())
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(taps(x).split(taps.dims, 1)[-1], method.projection_head(method.backbone(x)), atol=1e-5)
    # an exported backbone has no head: the layers only
    done = run_sslkit_here("eval", "layers", "--checkpoint", str(tiny_run / "backbone.safetensors"), "--epochs", "2",
                           "--output", str(out))
    assert done.returncode == 0 and json.loads(out.read_text())["projection"] is False
    bad = run_sslkit_here("eval", "layers", "--checkpoint", str(tiny_run / "backbone.safetensors"), "--every", "0",
                          "--output", str(out))
    assert bad.returncode == 2 and bad.stderr.strip() == "sslkit: error: --every must be at least 1, got 0"


def test_eval_moments_reports_plain_linear_beside(tiny_run, tmp_path):
    out = tmp_path / "moments.json"
    done = run_sslkit_here("eval", "moments", "--checkpoint", str(tiny_run / "backbone.safetensors"),
                           "--rank", "4", "--epochs", "5", "--output", str(out))
    assert done.returncode == 0, done.stderr
    probes = json.loads(out.read_text())["probes"]
    width = 8 * TINY_RECIPE["model"]["width"]
    assert {k: v["dim"] for k, v in probes.items()} == {"linear": width, "diag": 2 * width, "lowrank": width + 10}
    linear = tmp_path / "linear.json"
    assert run_sslkit_here("eval", "linear", "--checkpoint", str(tiny_run / "backbone.safetensors"), "--epochs", "5",
                           "--output", str(linear)).returncode == 0
    assert probes["linear"]["top1"] == pytest.approx(json.loads(linear.read_text())["top1"])  # same features
