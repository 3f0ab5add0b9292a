"""Every recipe in recipes/ loads, builds its method and views, and computes a finite loss.

Each recipe is checked at its own data's size (28 px grey for Fashion-MNIST, 32 px RGB for
CIFAR-10); ImageNet recipes run their forward at 64 px (local views 32 px, a ViT's img_size
64) to keep the CPU time down, with their full-size heads (DINO's 65536 prototypes, the
8192 x 3 projectors).

The forwards run on one thread: on a batch of 2 a second thread gains nothing, and on a
shared, oversubscribed machine two OpenMP threads made a ResNet-50 forward 15-40x slower
(1.3-3.5 s of CPU against 0.08 s on one thread).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sslkit.augment import create_augment
from sslkit.config import Config, load_config
from sslkit.methods import METHODS, create_method
from tests.conftest import set_step

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))

# data.name -> (channels, side) of the stored images the views are cut from
DATA_SHAPES = {"fashion_mnist": (1, 28), "cifar10": (3, 32)}
IMAGENET = "image_folder"
IMAGENET_TEST_SIZE = 64  # instead of 224: same code paths, a twelfth of the pixels


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def _test_config(path: Path) -> tuple[Config, tuple[int, int, int]]:
    """The recipe's config (ImageNet recipes shrunk to 64 px) and the (C, H, W) of its images."""
    cfg = load_config(path)
    if cfg.data.name != IMAGENET:
        channels, side = DATA_SHAPES[cfg.data.name]
        return cfg, (channels, side, side)
    size = IMAGENET_TEST_SIZE
    overrides = [f"augment.size={size}"]
    if cfg.augment.preset == "multicrop":
        overrides.append(f"augment.local_size={size // 2}")
    if "img_size" in cfg.model.timm_kwargs or cfg.model.backbone.startswith("vit_"):
        overrides.append(f"model.timm_kwargs.img_size={size}")
    return load_config(path, overrides), (3, size, size)


def _view_count(cfg: Config) -> int:
    """How many views the recipe's augment preset makes of each image."""
    if cfg.augment.preset == "multicrop":
        return 2 + cfg.augment.local_crops
    return 1 if cfg.augment.preset in ("single", "crop") else 2


def _is_imagenet(path: Path) -> bool:
    return load_config(path).data.name == IMAGENET


IMAGENET_RECIPES = [p for p in RECIPES if _is_imagenet(p)]
# The ImageNet forwards build ResNet-50s and ViTs with full-size heads: 1-5 s of CPU each
# (VICReg's covariance term over 8192 dimensions is the slowest), so they are marked slow;
# test_imagenet_recipe_builds keeps their construction in the fast suite.
FORWARD_CASES = [
    pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p in IMAGENET_RECIPES else []) for p in RECIPES
]


def test_there_are_recipes() -> None:
    assert len(RECIPES) >= 20, [p.name for p in RECIPES]


@pytest.mark.parametrize("path", RECIPES, ids=_ids(RECIPES))
def test_recipe_loads_and_says_what_it_is(path: Path) -> None:
    cfg = load_config(path)  # unknown keys or wrong types raise
    assert cfg.train.name == path.stem
    assert cfg.method.name in METHODS.names()
    assert cfg.data.name in (*DATA_SHAPES, IMAGENET), f"{path.name}: add its data shape to DATA_SHAPES"
    # the house style: a header comment that says what the recipe is and where it comes from
    assert path.read_text().startswith("#"), f"{path.name} has no header comment"


@pytest.mark.parametrize("path", IMAGENET_RECIPES, ids=_ids(IMAGENET_RECIPES))
def test_imagenet_recipe_builds(path: Path) -> None:
    """At full size (224 px views, 96 px local views): the method and its views build."""
    cfg = load_config(path)
    method = create_method(cfg, 1000)
    views = create_augment(cfg.augment)
    assert len(views.pipelines) == _view_count(cfg)
    assert method.online_probe is not None and method.online_probe.out_features == 1000


@pytest.mark.parametrize("path", FORWARD_CASES)
def test_recipe_forward_gives_a_finite_loss(path: Path) -> None:
    cfg, (channels, height, width) = _test_config(path)
    torch.manual_seed(0)
    method = create_method(cfg, 10)
    set_step(method, 0, steps_per_epoch=10, total_steps=100)
    augment = create_augment(cfg.augment)
    images = torch.randint(0, 256, (2, channels, height, width), dtype=torch.uint8)
    labels = torch.tensor([0, 1])
    generator = torch.Generator().manual_seed(0)
    views = augment(images, generator)
    assert len(views) == _view_count(cfg)
    out = method(views, labels)
    assert out["loss"].ndim == 0
    assert torch.isfinite(out["loss"]), f"{path.name}: loss {out['loss']}"
    assert out["features"].shape == (2, method.backbone.num_features)


def test_every_method_has_a_recipe_per_dataset() -> None:
    have: dict[str, set[str]] = {}
    for path in RECIPES:
        cfg = load_config(path)
        have.setdefault(cfg.method.name, set()).add(cfg.data.name)
    wanted = {"fashion_mnist", "cifar10", IMAGENET}
    missing = {name: sorted(wanted - have.get(name, set())) for name in METHODS.names()}
    missing = {name: data for name, data in missing.items() if data}
    assert not missing, f"methods without a recipe for these datasets: {missing}"
