"""A bad input stops the real launcher with exit code 2 and one line on stderr; the ds_config's
contract with the recipe; train.log_every."""

import json
import sys
import types

import pytest
import torch

from conftest import pretrain, read_metrics
from sst_dist.config import load_recipe
from sst_dist.engines.deepspeed import load_ds_config, read_ds_config
from sst_dist.errors import ConfigError


def write(path, text):
    path.write_text(text)
    return str(path)


def ds_config(tmp_path, **changes):
    config = json.loads(open("ds_configs/zero2.json").read())
    config.update(changes)
    return write(tmp_path / "ds.json", json.dumps(config))


def flash_attention_2_missing() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return True
    return False


TINY = "recipes/tiny-sst.yaml"
# name: (tmp_path -> (recipe, extra arguments), the line's start; {tmp} is tmp_path)
CASES = {
    # were tracebacks
    "beta1": (lambda tmp: (TINY, ["--set", "optim.beta1=1.5"]), "error: optim.beta1: 1.5 must be in [0, 1)"),
    "attn-unknown": (lambda tmp: (TINY, ["--set", "model.attn_implementation=flash"]),
                     "error: model.attn_implementation: 'flash' is not one of eager, sdpa,"),
    "attn-missing": (lambda tmp: (TINY, ["--set", "model.attn_implementation=flash_attention_2"]),
                     "error: model.attn_implementation: 'flash_attention_2' cannot be used here ("),
    "stage-7": (lambda tmp: (TINY, ["--ds-config", ds_config(tmp, zero_optimization={"stage": 7})]),
                "error: --ds-config {tmp}/ds.json: zero_optimization.stage is 7; use 1, 2 or 3"),
    "a-list": (lambda tmp: (TINY, ["--ds-config", write(tmp / "ds.json", "[1, 2]")]),
               "error: --ds-config {tmp}/ds.json: expected a JSON object {...}, got [1, 2]"),
    "zero-3": (lambda tmp: (TINY, ["--ds-config", ds_config(tmp, zero_optimization=3)]),
               "error: --ds-config {tmp}/ds.json: zero_optimization is 3; write it as an object"),
    "fp16-cpu": (lambda tmp: (TINY, ["--ds-config", ds_config(tmp, fp16={"enabled": True})]),
                 'error: --ds-config {tmp}/ds.json: fp16 is {"enabled": true}, but the recipe owns the precision'),
    # were silent
    "bf16-deepspeed-cpu": (lambda tmp: (TINY, ["--ds-config", "ds_configs/zero2.json", "--set", "train.dtype=bfloat16"]),
                           "error: train.dtype: bfloat16 under DeepSpeed needs a GPU"),
    "lr-nan": (lambda tmp: (TINY, ["--set", "optim.lr=nan"]), "error: optim.lr: 'nan' is not a finite number"),
    "compile-zero3": (lambda tmp: (TINY, ["--ds-config", "ds_configs/zero3.json", "--set", "model.compile=true"]),
                      "error: --ds-config ds_configs/zero3.json: model.compile under ZeRO-3 compiles only method sst's layers"),
    "empty": (lambda tmp: (write(tmp / "r.yaml", "# to do\n"), []), "error: --recipe {tmp}/r.yaml: the recipe is empty;"),
    "twice": (lambda tmp: (write(tmp / "r.yaml", "model: {size: tiny}\nrank: 8\nmodel: {seq_len: 64}\n"), []),
              "error: --recipe {tmp}/r.yaml: line 3: 'model' is written twice (first on line 1); keep one"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_stops_with_one_line(tmp_path, case):
    if case == "attn-missing" and not flash_attention_2_missing():
        pytest.skip("flash-attn is installed here")
    setup, line = CASES[case]
    recipe, extra = setup(tmp_path)
    proc = pretrain(tmp_path / "out", recipe, *extra, check=False, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(line.replace("{tmp}", str(tmp_path))), lines[0]
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_the_ds_config_is_a_json_object_with_a_known_stage(tmp_path):
    recipe = load_recipe("recipes/tiny-sst.yaml")
    for text, words in [('"zero2"', ['expected a JSON object', '"zero2"']),
                        ("{}", ["zero_optimization is null", '{"stage": 2}']),
                        ('{"zero_optimization": {"stage": 0}}', ["stage is 0", "use 1, 2 or 3"]),
                        ('{"zero_optimization": {"stage": true}}', ["stage is true"]),
                        ('{"zero_optimization": {"stage": 2}, "optimizer": "AdamW"}', ["optimizer is \"AdamW\""]),
                        ('{"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}',
                         ["scheduler", "optim.warmup_steps", "remove"]),
                        ('{"zero_optimization": {"stage": 2}, "fp16": true}', ["fp16 is true", "train.dtype"])]:
        with pytest.raises(ConfigError) as err:
            read_ds_config(write(tmp_path / "ds.json", text), recipe)
        assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), (text, str(err.value))


@pytest.mark.parametrize("key, value, recipe_key", [
    ("lr", 1e-4, "optim.lr = 0.003"), ("betas", [0.9, 0.95], "optim.beta1, optim.beta2 = 0.9, 0.999"),
    ("eps", 1e-6, "optim.eps = 1e-08"), ("weight_decay", 0.1, "optim.weight_decay = 0.0")])
def test_an_optimizer_setting_that_contradicts_the_recipe_names_both(tmp_path, key, value, recipe_key):
    """The recipe owns AdamW's settings; a fixed ds_config value used to be dropped on CPU (and
    to win over the recipe on GPU). "auto" and an equal value pass."""
    recipe = load_recipe("recipes/tiny-sst.yaml")
    params = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto", key: value}
    path = ds_config(tmp_path, optimizer={"type": "AdamW", "params": params})
    with pytest.raises(ConfigError) as err:
        read_ds_config(path, recipe)
    assert str(err.value) == (f"--ds-config {path}: optimizer.params.{key} is {json.dumps(value)} but the recipe"
                              f" has {recipe_key}; set it to \"auto\" (the recipe owns it) or change the recipe")
    equal = {"lr": 3e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0}
    path = ds_config(tmp_path, optimizer={"type": "AdamW", "params": equal})
    config = load_ds_config(path, recipe, device=torch.device("cpu"), dtype=torch.float32, micro_batch=4,
                            accumulation=1, world_size=2)
    assert config["optimizer"]["params"] == equal


def test_fp16_auto_or_off_passes_and_reaches_deepspeed_off(tmp_path):
    """DeepSpeed reads "auto" as true; the recipe owns the precision and has no fp16."""
    recipe = load_recipe("recipes/tiny-sst.yaml")
    fill = dict(device=torch.device("cpu"), dtype=torch.float32, micro_batch=4, accumulation=1, world_size=2)
    for value in ("auto", False):
        config = load_ds_config(ds_config(tmp_path, fp16={"enabled": value, "loss_scale": 0}), recipe, **fill)
        assert config["fp16"] == {"enabled": False, "loss_scale": 0}


def test_deepspeeds_per_step_device_waits_are_off_unless_a_config_asks_for_them(tmp_path):
    """DeepSpeed's throughput timer waits for the device at every micro-batch and its bf16 overflow
    check at every step, so the host could never queue work ahead; the trainer's divergence guard
    covers overflow. A ds_config that sets either keeps its own value."""
    recipe = load_recipe("recipes/tiny-sst.yaml")
    fill = dict(device=torch.device("cpu"), dtype=torch.float32, micro_batch=4, accumulation=1, world_size=2)
    config = load_ds_config(ds_config(tmp_path), recipe, **fill)
    assert config["timers"] == {"throughput": {"enabled": False}}
    assert config["bf16"]["check_grad_overflow"] is False
    asked = ds_config(tmp_path, timers={"throughput": {"enabled": True}}, bf16={"check_grad_overflow": True})
    config = load_ds_config(asked, recipe, **fill)
    assert config["timers"] == {"throughput": {"enabled": True}}
    assert config["bf16"]["check_grad_overflow"] is True


class FakeWandb(types.ModuleType):
    """Records what MetricsLogger hands to wandb."""

    def __init__(self):
        super().__init__("wandb")
        self.init_kwargs, self.logged = None, []

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return types.SimpleNamespace(id="run0", log=lambda record, step: self.logged.append(step),
                                     finish=lambda: None)


def test_wandb_gets_every_log_every_th_step_and_the_environment_mode(tmp_path, monkeypatch):
    from sst_dist.metrics import MetricsLogger

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "online")  # as a cluster script exports it
    recipe = load_recipe("recipes/tiny-sst.yaml", ["train.log_every=3", "train.max_steps=8"])
    logger = MetricsLogger(tmp_path, recipe, enabled=True, resume_step=0)
    for step in range(1, 9):
        logger.log({"step": step, "loss": 1.0, **({"eval_loss": 2.0} if step == 4 else {})})
    logger.close()
    assert fake.init_kwargs["mode"] == "online"
    assert fake.logged == [3, 4, 6, 8]  # every third, the evaluation, the last
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 9))


def test_log_every_thins_the_progress_bar_not_the_metrics(tmp_path):
    proc = pretrain(tmp_path, "recipes/tiny-full.yaml", "--max-steps", "7", "--set", "train.log_every=3")
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, 8))
    shown = {int(part.split("/7")[0].split()[-1]) for part in proc.stderr.split("|") if "/7 [" in part}
    assert shown <= {0, 3, 6, 7} and 7 in shown, proc.stderr[-2000:]
