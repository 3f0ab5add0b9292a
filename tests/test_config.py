import pytest

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
