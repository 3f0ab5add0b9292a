"""``sslkit export``: what it writes loads with timm alone and computes sslkit's features.

Two tiny runs through the CLI (a ResNet with SimCLR; a ViT with timm_kwargs under DINO, whose
teacher is the exported network), exported in both formats, then loaded in a fresh Python
process that cannot import sslkit.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from sslkit.config import config_from_dict
from sslkit.engine.checkpoint import export_backbone, load_feature_model
from sslkit.methods import create_method
from tests.conftest import TINY_RECIPE, run_sslkit_here

pytestmark = pytest.mark.slow

QUICK = ["train.max_steps=2", "train.epochs=1", "train.batch_size=16", "eval.knn=false"]
VIT_KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
              "global_pool": "avg", "fc_norm": False, "dynamic_img_size": True}
RUNS = {
    "resnet": ["model.backbone=resnet10t"],
    "vit_dino": ["model.backbone=vit_tiny_patch16_224", f"model.timm_kwargs={json.dumps(VIT_KWARGS)}",
                 "method={name: dino, proj_hidden_dim: 32, bottleneck_dim: 16, proj_output_dim: 64}"],
}

# Runs in a fresh interpreter: timm, torch and safetensors only; importing sslkit fails.
TIMM_ONLY = textwrap.dedent('''
    import importlib.abc, json, logging, sys
    from pathlib import Path

    class NoSslkit(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "sslkit" or name.startswith("sslkit."):
                raise ImportError("sslkit must not be needed to load an export")

    sys.meta_path.insert(0, NoSslkit())
    import timm, torch
    from safetensors.torch import load_file, save_file

    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("timm").addHandler(handler)

    jobs = json.loads(sys.argv[1])
    x = load_file(sys.argv[2])["x"]
    features, info = {}, {}
    for name, (fmt, folder) in jobs.items():
        if fmt == "timm":  # the exact line the export wrote
            scope = {}
            exec(json.loads((Path(folder) / "config.json").read_text())["sslkit"]["load"], scope)
            model = scope["model"]
        else:
            model = timm.create_model("local-dir:" + folder, pretrained=True)
        model.eval()
        with torch.no_grad():
            features[name] = model(x).contiguous()
        data = timm.data.resolve_data_config(model=model)
        info[name] = {"num_classes": model.num_classes, "data": {k: list(v) if isinstance(v, tuple) else v
                                                               for k, v in data.items()},
                      "depth": len(getattr(model, "blocks", [])), "embed_dim": getattr(model, "embed_dim", None)}
    save_file(features, sys.argv[3])
    print(json.dumps({"info": info, "warnings": warnings,
                      "sslkit_modules": [m for m in sys.modules if m.split(".")[0] == "sslkit"]}))
''')


def _cli(*args: str) -> tuple[int, str, str]:
    """``sslkit ARGS`` in this process: (exit code, stdout, stderr)."""
    done = run_sslkit_here(*args)
    return done.returncode, done.stdout, done.stderr


def _features(path: Path, x: torch.Tensor) -> torch.Tensor:
    _, model = load_feature_model(path)
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both runs trained once, exported, and loaded by timm alone in one fresh process."""
    root = tmp_path_factory.mktemp("export")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    runs = {}
    for name, overrides in RUNS.items():
        done = run_sslkit_here("train", str(recipe), f"train.output_dir={root}", f"train.name={name}", *QUICK,
                               *overrides)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = root / name

    stdout = {}
    jobs = {  # name: (format, folder)
        "resnet_timm": ("timm", runs["resnet"] / "export" / "timm"),
        "resnet_hf": ("hf", runs["resnet"] / "export" / "hf"),
        "vit_dino_timm": ("timm", root / "vit_from_ckpt"),
        "vit_dino_hf": ("hf", runs["vit_dino"] / "export" / "hf"),
    }
    for name, (fmt, folder) in jobs.items():
        run = runs[name.rsplit("_", 1)[0]]
        args = ["export", str(run)] if fmt == "timm" else ["export", str(run), "--format", "hf"]
        if name == "vit_dino_timm":  # the teacher from the checkpoint, elsewhere
            args += ["--checkpoint", str(run / "checkpoints" / "last"), "--output", str(folder)]
        code, stdout[name], err = _cli(*args)
        assert code == 0, err

    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    save_file({"x": x}, str(root / "x.safetensors"))
    loaded = subprocess.run(
        [sys.executable, "-c", TIMM_ONLY, json.dumps({k: (f, str(p)) for k, (f, p) in jobs.items()}),
         str(root / "x.safetensors"), str(root / "timm_features.safetensors")],
        capture_output=True, text=True, cwd=root, timeout=300,
        env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1"},
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    report = json.loads(loaded.stdout.strip().splitlines()[-1])
    return {"runs": runs, "jobs": jobs, "stdout": stdout, "x": x, "report": report,
            "timm": load_file(str(root / "timm_features.safetensors"))}


def test_timm_alone_loads_every_export_silently(exported):
    report = exported["report"]
    assert report["sslkit_modules"] == []
    assert report["warnings"] == []  # strict, unadapted loads: no classifier or stem surgery
    assert all(info["num_classes"] == 0 for info in report["info"].values())


def test_resnet_exports_compute_sslkit_features(exported):
    run, x = exported["runs"]["resnet"], exported["x"]
    expected = _features(run / "backbone.safetensors", x)
    assert expected.shape == (3, 512)
    for name in ("resnet_timm", "resnet_hf"):
        torch.testing.assert_close(exported["timm"][name], expected, atol=1e-5, rtol=1e-5)


def test_vit_timm_kwargs_round_trip(exported):
    run, x = exported["runs"]["vit_dino"], exported["x"]
    for name in ("vit_dino_timm", "vit_dino_hf"):
        folder = exported["jobs"][name][1]
        config = json.loads((folder / "config.json").read_text())
        assert config["architecture"] == "vit_tiny_patch16_224"
        assert config["model_args"] == {"num_classes": 0, **VIT_KWARGS}
        assert config["num_features"] == 32
        info = exported["report"]["info"][name]
        assert (info["depth"], info["embed_dim"]) == (2, 32)  # not the registry's 12 x 192
    expected = _features(run / "backbone.safetensors", x)
    torch.testing.assert_close(exported["timm"]["vit_dino_hf"], expected, atol=1e-5, rtol=1e-5)


def test_dino_exports_the_teacher(exported):
    run, x = exported["runs"]["vit_dino"], exported["x"]
    last = run / "checkpoints" / "last"
    torch.testing.assert_close(exported["timm"]["vit_dino_timm"], _features(last, x), atol=1e-5, rtol=1e-5)

    state = load_file(str(last / "model.safetensors"))
    weights = load_file(str(exported["jobs"]["vit_dino_timm"][1] / "model.safetensors"))
    teacher = {k[len("teacher.module.0."):]: v for k, v in state.items() if k.startswith("teacher.module.0.")}
    student = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    assert weights.keys() == teacher.keys() == student.keys()
    assert all(torch.equal(weights[k], teacher[k]) for k in weights)
    assert not all(torch.equal(weights[k], student[k]) for k in weights)  # two steps apart: not the student


def test_preprocessing_is_the_runs(exported):
    """timm.data.resolve_data_config(model=model) gives sslkit's evaluation transform."""
    for name, info in exported["report"]["info"].items():
        data = info["data"]
        assert data["input_size"] == [3, 16, 16], name
        assert data["crop_pct"] == 1.0 and data["crop_mode"] == "squash" and data["interpolation"] == "bilinear"
        assert data["mean"] == pytest.approx((0.485, 0.456, 0.406))
        assert data["std"] == pytest.approx((0.229, 0.224, 0.225))


def test_cli_defaults_and_what_is_written(exported):
    run = exported["runs"]["resnet"]
    out = exported["stdout"]["resnet_timm"]
    assert f"exported {run / 'backbone.safetensors'} (timm) -> {run.absolute() / 'export' / 'timm'}" in out
    timm_dir, hf_dir = run / "export" / "timm", run / "export" / "hf"
    config = json.loads((timm_dir / "config.json").read_text())
    load = config["sslkit"]["load"]
    assert load in out and load in (timm_dir / "README.md").read_text()
    assert f"file='{timm_dir.absolute() / 'model.safetensors'}'" in load and "num_classes=0" in load
    assert "local-dir:" in exported["stdout"]["resnet_hf"]

    card = (hf_dir / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n")
    assert 'timm.create_model("hf-hub:<user>/<repo>", pretrained=True)' in card and "| method | simclr |" in card
    assert str(run.parent) not in card and str(run.parent) not in (hf_dir / "config.json").read_text()
    hf_config = json.loads((hf_dir / "config.json").read_text())
    assert {"architecture", "num_classes", "num_features", "model_args", "pretrained_cfg"} <= hf_config.keys()
    assert hf_config["pretrained_cfg"]["num_classes"] == 0
    # the weights are timm's keys, and sslkit reads an export too (its config rides in the metadata)
    assert load_file(str(hf_dir / "model.safetensors")).keys() == load_file(str(run / "backbone.safetensors")).keys()
    cfg, _ = load_feature_model(timm_dir / "model.safetensors")
    assert cfg.model.backbone == "resnet10t" and cfg.data.root is None


def _run_dir(tmp_path: Path, **model) -> Path:
    """A run directory holding only backbone.safetensors (no training needed to refuse it)."""
    cfg = config_from_dict({**TINY_RECIPE, "model": model})
    run = tmp_path / "run"
    run.mkdir()
    export_backbone(create_method(cfg), cfg, run / "backbone.safetensors")
    return run


@pytest.mark.parametrize("model, message", [
    ({"backbone": "tiny_cnn", "width": 8}, "sslkit's own network: timm has no such architecture"),
    ({"backbone": "resnet18", "small_stem": True}, "no timm ResNet configuration builds that stem"),
])
def test_backbones_timm_cannot_build_are_refused(tmp_path, model, message):
    run = _run_dir(tmp_path, **model)
    for fmt in ("timm", "hf"):
        code, _, err = _cli("export", str(run), "--format", fmt)
        assert code == 2 and message in err and "backbone.safetensors with sslkit" in err
        assert not (run / "export").exists()


@pytest.mark.parametrize("fmt, change, message", [
    ("timm", {"depth": 1}, "could not load the timm export back"),  # other weights: the strict load fails
    ("hf", {"depth": 1}, "could not load the hf export back"),
    ("timm", {"global_pool": "token"}, "computes other features than sslkit"),  # same weights, other network
    ("hf", {"global_pool": "token"}, "computes other features than sslkit"),
])
def test_an_export_timm_would_load_differently_is_removed(exported, tmp_path, monkeypatch, fmt, change, message):
    """Were the timm kwargs written wrong, timm would build another network: the export fails, leaving nothing."""
    import sslkit.export

    real = sslkit.export.timm_model_args
    monkeypatch.setattr(sslkit.export, "timm_model_args", lambda cfg: (real(cfg)[0], {**real(cfg)[1], **change}))
    out = tmp_path / "out"
    code, _, err = _cli("export", str(exported["runs"]["vit_dino"]), "--format", fmt, "--output", str(out))
    assert code == 2 and message in err, err
    assert not out.exists()


def test_not_a_run_directory(tmp_path):
    code, _, err = _cli("export", str(tmp_path))
    assert code == 2 and "neither backbone.safetensors nor checkpoints/last" in err
    code, _, err = _cli("export", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err
