import subprocess
import sys

import pytest

from sst_dist.config import ConfigError, load_recipe


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=1", ["optim.lrr", "lowrank_lr"]),
    ("rank=65", ["rank", "1..64"]),
    ("rank=0", ["rank", "positive"]),
    ("rank=-3", ["rank", "positive"]),
    ("method=dora", ["method", "sst", "relora"]),
    ("model.size=7b", ["model.size", "1.3b"]),
    ("sst.path=fast", ["sst.path", "factored"]),
    ("train.max_steps=abc", ["train.max_steps", "integer"]),
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
