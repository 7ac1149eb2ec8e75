import subprocess
import sys

import pytest
import yaml

from sst_dist.config import load_recipe
from sst_dist.errors import ConfigError


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=1", ["optim.lrr", "lowrank_lr"]),
    ("rank=65", ["rank", "1..64"]),
    ("rank=0", ["rank", "positive"]),
    ("rank=-3", ["rank", "positive"]),
    ("method=dora", ["method", "sst", "relora"]),
    ("model.size=7b", ["model.size", "1.3b"]),
    ("sst.path=fast", ["sst.path", "factored"]),
    ("sst.init=qr", ["sst.init", "auto", "haar"]),
    ("galore.projector=lanczos", ["galore.projector", "svd", "randomized"]),
    ("galore.refresh_layers=0", ["galore.refresh_layers", "> 0"]),
    ("model.frozen_dtype=float16", ["model.frozen_dtype", "bfloat16"]),
    ("model.build=lazy", ["model.build", "meta"]),
    ("optim.reset=zero", ["optim.reset", "'zero'", "exact", "moments"]),
    ("checkpoint.save=maybe", ["checkpoint.save", "true or false"]),
    ("train.max_steps=abc", ["train.max_steps", "integer"]),
    ("optim.beta1=1.5", ["optim.beta1", "1.5", "[0, 1)"]),
    ("optim.beta2=1", ["optim.beta2", "[0, 1)"]),
    ("optim.eps=0", ["optim.eps", "> 0"]),
    ("optim.lr=nan", ["optim.lr", "finite"]),
    ("optim.lowrank_lr=.inf", ["optim.lowrank_lr", "finite"]),
    ("galore.scale=-inf", ["galore.scale", "finite"]),
    ("galore.scale=0", ["galore.scale", "> 0"]),
    ("lora.alpha=0", ["lora.alpha", "> 0"]),
    ("model.attn_implementation=flash", ["model.attn_implementation", "eager", "sdpa", "flash_attention_2"]),
    ("train.collective_timeout_s=0", ["train.collective_timeout_s", "> 0"]),
    ("seed=-1", ["seed", ">= 0"]),
    ("data.num_proc=-2", ["data.num_proc", ">= 0"]),
    ("data.max_docs=0", ["data.max_docs", "> 0"]),
])
def test_bad_recipes_name_the_key_and_the_allowed_values(override, words):
    with pytest.raises(ConfigError) as err:
        load_recipe("recipes/tiny-sst.yaml", [override])
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_overrides_and_types():
    recipe = load_recipe("recipes/tiny-sst.yaml", ["optim.lr=3e-4", "targets=q_proj,fc1", "sst.path=factored"])
    assert recipe.optim.lr == 3e-4 and recipe.targets == ["q_proj", "fc1"] and recipe.sst.path == "factored"


def test_cli_reports_one_line_and_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: sst\nmodel: {size: tiny}\nrank: 999\n")
    proc = subprocess.run([sys.executable, "launch/pretrain.py", "--recipe", str(bad), "--output-dir",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: rank: 999 exceeds min(out, in) = 64 of model 'tiny'; use 1..64"]


@pytest.mark.parametrize("text, words", [
    ("method: sst\noptim: {lr: 1.0e-3}\nmodel: {size: tiny}\noptim:\n  beta1: 0.8\n",
     ["line 4", "'optim'", "first on line 2"]),
    ("method: sst\nmodel:\n  size: tiny\n  seq_len: 64\n  size: 125m\n", ["line 5", "'size'", "first on line 3"]),
])
def test_a_key_written_twice_is_refused(tmp_path, text, words):
    assert yaml.safe_load(text)  # plain YAML would keep the second silently
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"--recipe {path}:")
    for word in words:
        assert word in message


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "---\n"])
def test_an_empty_recipe_is_refused(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="the recipe is empty"):
        load_recipe(path)


def test_environment_fills_only_what_the_recipe_leaves_unset(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    recipe = load_recipe("recipes/tiny-sst.yaml")
    assert (recipe.wandb.mode, recipe.wandb.project) == ("disabled", "from-env")
    recipe = load_recipe("recipes/tiny-sst.yaml", ["wandb.mode=online"])
    assert (recipe.wandb.mode, recipe.wandb.project) == ("online", "from-env")
    monkeypatch.delenv("WANDB_MODE")
    assert load_recipe("recipes/tiny-sst.yaml").wandb.mode == "offline"  # the default
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    with pytest.raises(ConfigError, match="WANDB_MODE: 'dryrun' is not one of offline, online, disabled"):
        load_recipe("recipes/tiny-sst.yaml")


def test_a_moved_key_names_its_new_place_in_one_line(tmp_path):
    words = "sst.frozen_dtype: moved to model.frozen_dtype (same values); write model.frozen_dtype: bfloat16"
    with pytest.raises(ConfigError) as err:
        load_recipe("recipes/tiny-sst.yaml", ["sst.frozen_dtype=bfloat16"])
    assert str(err.value) == words
    old = tmp_path / "old.yaml"
    old.write_text("method: sst\nmodel: {size: tiny}\nsst: {path: factored, frozen_dtype: bfloat16}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(old)
    assert str(err.value) == words


def test_a_saved_recipe_with_a_moved_key_still_loads():
    """recipe.json and checkpoints written before the move keep their value under the new name."""
    from sst_dist.config import Recipe, _build, upgrade_saved

    tree = load_recipe("recipes/tiny-sst.yaml").to_dict()
    del tree["model"]["frozen_dtype"]
    tree["sst"]["frozen_dtype"] = "bfloat16"
    upgraded = upgrade_saved(tree)
    assert "frozen_dtype" not in upgraded["sst"] and "frozen_dtype" in tree["sst"]  # a copy
    assert _build(Recipe, upgraded).model.frozen_dtype == "bfloat16"


def test_meta_build_loads_for_every_method():
    from sst_dist.registry import METHODS

    for method in METHODS:
        assert load_recipe(f"recipes/tiny-{method}.yaml", ["model.build=meta"]).model.build == "meta"


def test_every_scale_recipe_loads():
    """The scale recipes (bench/scale.py) build on the meta device with checkpointing, and every
    method's store its frozen tensors alike, so the largest size each trains compares fairly."""
    from pathlib import Path

    recipes = sorted(Path("recipes").glob("opt-*b-*.yaml"))
    assert len(recipes) >= 26
    for size in ("1.3b", "6.7b", "13b", "30b", "66b"):
        assert Path(f"recipes/opt-{size}-lora.yaml").is_file()
    for path in recipes:
        recipe = load_recipe(path)
        if path.stem.split("-")[1] in ("2.7b", "6.7b", "13b", "30b", "66b") or recipe.method == "lora":
            assert recipe.model.build == "meta" and recipe.model.gradient_checkpointing
            if recipe.method != "full":
                assert recipe.model.frozen_dtype == "bfloat16", path
