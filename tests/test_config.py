import pytest
import torch

from sslkit.config import Config, ConfigError, load_config, save_config


def test_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 0.1\ntrain:\n  epochs: 3\n")
    cfg = load_config(recipe, ["optim.lr=0.3", "train.batch_size=64", "augment.scale=[0.2, 1.0]",
                               "data.root=/some/where", "eval.bank_limit=null", "eval.knn_ks=[10, 200]"])
    assert cfg.optim.lr == 0.3
    assert cfg.train.epochs == 3
    assert cfg.train.batch_size == 64
    assert cfg.augment.scale == (0.2, 1.0)
    assert cfg.data.root == "/some/where"
    assert cfg.eval.bank_limit is None
    assert cfg.eval.knn_ks == (10, 200)
    assert cfg.train.name == "r"  # the run is named after its recipe


def test_int_promoted_to_float_and_roundtrip(tmp_path):
    cfg = load_config(None, ["optim.lr=1", "train.name=x"])
    assert isinstance(cfg.optim.lr, float)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.lrr=0.3", ["optim.lrr", "optim.lr"]),
        ("trian.epochs=3", ["trian", "train"]),
        ("train.epochs=many", ["train.epochs", "int"]),
        ("train.progress=3", ["train.progress", "true or false"]),
        ("augment.scale=0.5", ["augment.scale", "list of 2"]),
        ("eval.knn_ks=[10, ten]", ["eval.knn_ks[1]", "int"]),
        ("optim.lr", ["key=value"]),
    ],
)
def test_bad_keys_and_values_name_the_problem(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


def test_missing_recipe():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("recipes/nope.yaml")


def test_every_shipped_recipe_loads():
    from pathlib import Path

    recipes = sorted(Path(__file__).parents[1].glob("recipes/*.yaml"))
    assert len(recipes) >= 4
    for recipe in recipes:
        assert isinstance(load_config(recipe), Config)


def test_exponent_without_a_decimal_point_is_a_float():
    assert load_config(None, ["optim.lr=3e-3"]).optim.lr == 3e-3
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["optim.lr=fast"])


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["augment.hflip_prob=1.5"], ["augment.hflip_prob=1.5", "less than or equal to 1"]),
        (["train.epochs=0"], ["train.epochs=0", "greater than or equal to 1"]),
        (["method.mask_ratio=0.5"], ["method.mask_ratio", "of method 'simclr'", "its keys: name"]),
        (["augment.scale=[0.9,0.2]"], ["augment.scale", "ordered"]),
        (["augment.size=0"], ["augment.size=0"]),
        (["optim.lr=-1"], ["optim.lr=-1", "greater than 0"]),
        (["train.precision=fp8"], ["train.precision", "'no', 'bf16' or 'fp16'"]),
        (["model.backbone=resnet1"], ["model.backbone='resnet1'", "did you mean 'resnet18'"]),
        (["method.name=dino", "method.temperature=0.2"], ["method.temperature", "of method 'dino'"]),
        (["method.name=mae", "method.mask_ratio=1.0"], ["method.mask_ratio=1.0", "less than 1"]),
        (["augment.preset=byol", "augment.view_blur_probs=[0.5]"], ["augment.view_blur_probs", "expected 2 values"]),
        (["optim.name=adamw", "optim.momentum=0.9"], ["optim.momentum", "of optimizer 'adamw'"]),
        (["augment.blur_kernel=4"], ["augment.blur_kernel=4", "odd"]),
        (["data.name=cifar1O"], ["data.name='cifar1O'", "did you mean 'cifar10'"]),
    ],
)
def test_every_bad_value_is_one_line_naming_its_key(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_timm_kwargs_read_yaml_numbers_as_numbers():
    cfg = load_config(None, ["model.backbone=vit_tiny_patch16_224", "model.timm_kwargs={drop_path_rate: 1e-5}"])
    assert cfg.model.timm_kwargs["drop_path_rate"] == 1e-5  # YAML 1.1 reads 1e-5 as the text '1e-5'


def test_a_method_named_alone_gets_its_papers_defaults_and_preset():
    from sslkit.methods import create_method
    from sslkit.methods.dino import DINOConfig

    cfg = load_config(None, ["method.name=dino", "model.backbone=tiny_cnn", "model.width=8"])
    assert isinstance(cfg.method, DINOConfig) and cfg.augment.preset == "multicrop"
    head = create_method(cfg).projection_head
    assert head.last_layer.weight.shape == (65536, 256)  # main_dino.py: 65536 prototypes, bottleneck 256
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules())  # use_bn_in_head=False
    assert load_config(None, ["method.name=mocov3"]).method.temperature == 0.2
    byol = load_config(None, ["method.name=byol"]).method
    assert (byol.proj_hidden_dim, byol.proj_output_dim, byol.pred_hidden_dim) == (4096, 256, 4096)
    assert load_config(None, ["method.name=mae"]).augment.preset == "single"


def test_a_whole_method_section_replaces_another_methods_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: {name: simclr, temperature: 0.3}\n")
    with pytest.raises(ConfigError, match="method.temperature"):
        load_config(recipe, ["method.name=byol"])
    assert load_config(recipe, ["method={name: byol}"]).method.name == "byol"


def test_saved_config_round_trips_every_kind(tmp_path):
    for overrides in (["method.name=dino", "optim.name=adamw"], ["method.name=mae", "optim.name=lars"]):
        cfg = load_config(None, overrides + ["train.name=x"])
        save_config(cfg, tmp_path / "c.yaml")
        again = load_config(tmp_path / "c.yaml")
        assert again == cfg and type(again.method) is type(cfg.method) and type(again.augment) is type(cfg.augment)


def test_data_sources_own_their_keys() -> None:
    cfg = load_config(None, ["data.name=image_folder", "data.labels=none", "data.root=/x", "data.image_size=8",
                             "eval.data.name=fashion_mnist", "eval.data.test_limit=10"])
    assert type(cfg.data).__name__ == "ImageFolderConfig" and cfg.data.labels == "none"
    assert cfg.eval.data.name == "fashion_mnist" and cfg.eval.data.test_limit == 10
    assert cfg.to_dict()["data"]["labels"] == "none"  # dumped with the source's own keys
    with pytest.raises(ConfigError, match=r"unknown config key 'data.labels' of dataset 'cifar10'"):
        load_config(None, ["data.name=cifar10", "data.labels=none"])
    with pytest.raises(ConfigError, match=r"eval.data.labels='some': expected 'auto', 'folders' or 'none'"):
        load_config(None, ["eval.data.name=image_folder", "eval.data.labels=some"])
    with pytest.raises(ConfigError, match=r"eval.data.name='fashion_mnst'.*did you mean 'fashion_mnist'"):
        load_config(None, ["eval.data.name=fashion_mnst"])
