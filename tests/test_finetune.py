"""Fine-tuning: LP-FT improves on the frozen probe, layer-wise decay, label fractions, the command."""

import json
import os
from pathlib import Path

import pytest
import timm
import torch

from sslkit.eval.clean import clean_splits, evaluation_setup
from sslkit.eval.finetune import FinetuneConfig, finetune, param_groups, probe_head
from sslkit.eval.linear import standardize, train_linear_probes
from tests.conftest import run_sslkit_here


def test_probe_head_takes_raw_features_and_equals_the_standardised_probe():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g) * torch.tensor([1.0, 5, 0.1, 2, 3, 1]) + 4  # scales the fold must undo
    y = (x[:, 0] - 4 > 0).long() + 2 * (x[:, 1] - 4 > 0).long()  # (300,) 4 classes
    head = probe_head(x, y, 4, seed=0)
    xs, = standardize(x, x)
    ref = train_linear_probes(xs, y, xs, y, 4)["top1"]
    assert (head(x).argmax(1) == y).float().mean().item() >= ref - 0.02 and ref > 0.9


def test_finetuning_improves_on_the_frozen_probe(tiny_run):
    """Fashion-MNIST at its own 28 px (the synthetic set is separable by the frozen features already)."""
    if not Path("/usr/share/datasets/fashion-mnist").is_dir() and "SSLKIT_DATA" not in os.environ:
        pytest.skip("Fashion-MNIST is not installed (make test installs it)")
    cfg, model, accelerator = evaluation_setup(tiny_run / "backbone.safetensors", "fashion_mnist", None,
                                               {"eval.bank_limit": 1024, "eval.test_limit": 1000}, ["augment.size=28"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, test = clean_splits(cfg)
    # at lr ~0 the network stays the probe: the head takes raw features, BatchNorm keeps its statistics
    still = finetune(cfg, model, accelerator, train, train.labels, test, 10,
                     FinetuneConfig(epochs=1, min_steps=2, batch_size=64, lr=1e-12), seed=0)
    assert still["top1"] == pytest.approx(still["probe_top1"], abs=0.002)
    r = finetune(cfg, model, accelerator, train, train.labels, test, 10,
                 FinetuneConfig(epochs=1, min_steps=120, batch_size=64, lr=1e-2), seed=0)
    assert r["top1"] > r["probe_top1"] + 0.02, r  # training the backbone beats its frozen features
    assert r["steps"] == 120 and r["images"] == 1024
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the given network is untouched


def test_layer_decay_scales_each_vit_block_by_the_closed_form():
    depth, decay = 4, 0.75
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=4, depth=depth,
                            embed_dim=32, num_heads=2)
    head = torch.nn.Linear(32, 3)
    groups = param_groups(vit, head, FinetuneConfig(layer_decay=decay))
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for i, block in enumerate(vit.blocks):
        assert scale[id(block.attn.qkv.weight)] == pytest.approx(decay ** (depth - i))
    assert scale[id(vit.patch_embed.proj.weight)] == scale[id(vit.cls_token)] == pytest.approx(decay ** (depth + 1))
    assert scale[id(head.weight)] == 1.0 and scale[id(vit.norm.weight)] == 1.0
    no_decay = [g for g in groups if g["weight_decay"] == 0 for p in g["params"] if p is vit.blocks[0].norm1.bias]
    assert no_decay  # biases and norms are not decayed
    cnn_groups = param_groups(torch.nn.Sequential(torch.nn.Linear(3, 3)), head, FinetuneConfig())
    assert {g["lr_scale"] for g in cnn_groups} == {1.0}  # not a ViT: no layer decay


def test_eval_finetune_on_label_fractions_through_the_cli(tiny_run, tmp_path):
    out = tmp_path / "ft.json"
    done = run_sslkit_here("eval", "finetune", "--checkpoint", str(tiny_run / "backbone.safetensors"),
                           "--label-fraction", "0.2", "1", "--seeds", "0", "1", "--min-steps", "3", "--epochs", "1",
                           "--freeze-bn-stats", "false", "--output", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert list(result["fractions"]) == ["0.2", "1.0"]
    runs = result["fractions"]["0.2"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and all(r["images"] == 100 for r in runs)  # 20% of 512, balanced
    assert result["settings"]["min_steps"] == 3 and result["settings"]["freeze_bn_stats"] is False
    assert "20% of labels" in done.stdout
    bad = run_sslkit_here("eval", "finetune", "--checkpoint", str(tiny_run / "backbone.safetensors"), "--lr", "-1",
                          "--output", str(out))
    assert bad.returncode == 2 and bad.stderr.strip() == "sslkit: error: finetune.lr=-1.0: expected greater than 0"
