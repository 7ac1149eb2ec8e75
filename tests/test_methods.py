"""The method protocol: every recipe method is registered, and its hooks reach the method's layers
and groups through sst_dist.methods alone (the trainer names no method)."""

import pytest
import torch

from sst_dist.config import load_recipe
from sst_dist.evaluate import lm_loss
from sst_dist.engines.torch import TorchBackend
from sst_dist.methods import Hooks, Method, ProbePass, build_method
from sst_dist.models import build_model
from sst_dist.registry import METHODS
from sst_dist.sst import SSTLinear


def _built(method, *sets):
    recipe = load_recipe(f"recipes/tiny-{method}.yaml", list(sets))
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=256, seq_len=recipe.model.seq_len)
    built = build_method(recipe, model)
    built.attach(TorchBackend(), recipe)
    return recipe, model, built


def test_every_recipe_method_is_registered():
    assert len(METHODS) == 6
    for name, entry in METHODS.items():
        assert entry.name == name and callable(entry.builder), name


@pytest.mark.parametrize("method, groups", [
    ("full", ["full"]), ("lora", ["full", "lowrank"]), ("relora", ["full", "lowrank"]),
    ("sst", ["full", "lowrank"]), ("galore", ["full", "galore"]), ("sst+galore", ["full", "lowrank", "galore"]),
])
def test_groups_cover_every_trainable_parameter_once(method, groups):
    _, model, built = _built(method)
    param_groups = built.param_groups(model)
    assert [g["name"] for g in param_groups] == groups
    ids = [id(p) for g in param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert set(built.learning_rates(0)) >= set(groups)
    lowrank = [g for g in param_groups if g["name"] == "lowrank"]
    # the groups whose slots the periodic work resets count steps per element (sst_dist.optim)
    assert [g["resettable"] for g in lowrank] == ([method != "lora"] if lowrank else [])


@pytest.mark.parametrize("method, first", [
    ("full", None), ("lora", None), ("relora", 5), ("sst", 5), ("galore", 10), ("sst+galore", 5)])
def test_first_event_step_is_the_schedules(method, first):
    _, _, built = _built(method)
    assert built.first_event_step() == first
    if first is not None and method != "galore":
        assert built.schedule.event(first) is not None
        assert all(built.schedule.event(s) is None for s in range(1, first))


@pytest.mark.parametrize("path", ["dense", "materialized", "factored"])
def test_before_micro_batch_reaches_only_the_materialized_layers(path):
    _, model, built = _built("sst", f"sst.path={path}")
    layers = [m for m in model.modules() if isinstance(m, SSTLinear)]
    assert layers and all(layer in built.layers.values() for layer in layers)
    for last in (False, True, False):
        built.before_micro_batch(last=last)
        assert all(layer.holds_gradient == (path == "materialized" and not last) for layer in layers)


def test_parts_run_in_order_and_name_their_events():
    calls = []

    class Part(Hooks):
        def __init__(self, name):
            self.name = name

        def before_step(self, step, probe_pass):
            calls.append((self.name, "before", step))
            return [self.name] if step % 2 else []

        def after_step(self, lrs):
            calls.append((self.name, "after", lrs["full"]))

    _, _, full = _built("full")
    method = Method("two", full.schedule, [Part("a"), Part("b")])
    assert method.before_step(0) is None and method.before_step(1) == "a+b"
    method.after_step({"full": 0.5})
    assert calls == [("a", "before", 0), ("b", "before", 0), ("a", "before", 1), ("b", "before", 1),
                     ("a", "after", 0.5), ("b", "after", 0.5)]


def test_galore_refresh_in_groups_takes_the_one_pass_projectors():
    """galore.refresh_layers: with several micro-batches, a refresh sums each layer's G over them
    in one probe pass per group of layers: more passes, the same projectors."""
    blocks = torch.randint(0, 256, (2, 2, 17), generator=torch.Generator().manual_seed(1))
    projectors, passes = {}, {}
    for group in ("null", "5"):
        _, model, built = _built("galore", f"galore.refresh_layers={group}")
        runs = []

        def run(probe):
            runs.append(probe)
            for block in blocks:
                probe.backward(lm_loss(model, block))

        assert built.before_step(0, ProbePass(len(blocks), run)) == "refresh"
        projectors[group] = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".proj")}
        passes[group] = [len(probe.group) for probe in runs]
    assert passes == {"null": [12], "5": [5, 5, 2]}
    for name, P in projectors["null"].items():
        assert P.abs().max() > 0
        torch.testing.assert_close(projectors["5"][name], P, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("method, fields", [
    ("full", ["lr", "lowrank_lr"]), ("sst", ["lr", "lowrank_lr"]), ("galore", ["lr", "lowrank_lr", "galore_lr"]),
    ("sst+galore", ["lr", "lowrank_lr", "galore_lr"]),
])
def test_lr_fields_keep_the_metrics_names(method, fields):
    _, _, built = _built(method)
    lrs = built.learning_rates(3)
    logged = Method.lr_fields(lrs)
    assert list(logged) == fields
    assert logged["lr"] == lrs["full"] and logged["lowrank_lr"] == lrs["lowrank"]


def test_materializer_settings_come_from_the_method():
    _, _, sst = _built("sst", "sst.init=haar", "sst.uniform_mix=true", "model.frozen_dtype=bfloat16",
                       "train.dtype=bfloat16")
    assert sst.materializer_kwargs() == {"frozen_dtype": torch.bfloat16, "init": "haar", "uniform_mix": True}
    _, _, lora = _built("lora")
    assert lora.materializer_kwargs() == {"frozen_dtype": None}


def test_an_engine_the_method_does_not_support_is_one_line(monkeypatch):
    from sst_dist.errors import ConfigError
    from sst_dist.registry import spec

    monkeypatch.setattr(spec("lora"), "engines", ("torch",))
    with pytest.raises(ConfigError, match="--engine fsdp: method lora runs on torch; use one of those"):
        spec("lora").check_engine("fsdp")
    spec("lora").check_engine("torch")
