"""model.compile: torch.compile of each decoder block changes no loss beyond floating point, for
every method, its periodic events included (the methods' own layers stay eager inside the
compiled blocks)."""

import pytest
import torch
from torch._dynamo.utils import counters

from sst_dist.config import load_recipe
from sst_dist.engines import distributed_context
from sst_dist.errors import ConfigError
from sst_dist.engines.deepspeed import read_ds_config
from sst_dist.models import build_model, compile_layers, decoder_blocks
from sst_dist.registry import METHODS
from sst_dist.train import build_run, train_step

STEPS = 6
VOCAB = 512


def _losses(method: str, compile: bool, *sets, breaks: dict | None = None, after_build=None) -> list[float]:
    torch._dynamo.reset()  # each run compiles afresh: no graph of another run's model is reused
    counters.clear()
    # an event every other step: SST resamples (and re-SVDs), ReLoRA* resets, GaLore refreshes
    recipe = load_recipe(f"recipes/tiny-{method}.yaml", [
        f"model.compile={str(compile).lower()}", "sst.steps_per_iteration=2", "relora.reset_every=2",
        "galore.update_proj_gap=2", *sets])
    built, engine = build_run(recipe, "torch", distributed_context("torch"), device=torch.device("cpu"),
                              dtype=torch.float64, vocab_size=VOCAB, micro_batch=4, accumulation=2)
    if after_build is not None:
        after_build(engine, built)
    tokens = torch.Generator().manual_seed(1)
    out = []
    for step in range(STEPS):
        chunks = torch.randint(0, VOCAB, (8, 33), generator=tokens).split(4)
        out.append(float(train_step(engine, built, step, chunks).loss))
    if compile or after_build:  # the model did go through the compiler (else the comparison proves nothing)
        assert counters["stats"]["unique_graphs"] >= 1
    if breaks is not None:
        breaks.update(counters["graph_break"])
    return out


# float64 masters and compute: inductor's fused kernels sum in another order than eager's
# (LayerNorm's moments, softmax, the residual adds), which moves each op's result by a few ulps,
# 1e-16 relative; six Adam steps amplify that by orders of magnitude at most, so 1e-10 separates
# rounding from any real change (a skipped event or a stale weight moves the loss by > 1e-4).
@pytest.mark.parametrize("method", METHODS)
def test_compiled_blocks_follow_the_eager_losses(method):
    eager, compiled = _losses(method, False), _losses(method, True)
    assert compiled == pytest.approx(eager, rel=1e-10, abs=0)


@pytest.mark.parametrize("sets", [(), ("sst.path=functional",)])
def test_compiled_llama_blocks_follow_the_eager_losses(sets):
    """A LLaMA block (RMSNorm, rotary positions, SwiGLU) with SST's eager layers inside it, and
    with the functional path traced into its graph."""
    eager, compiled = _losses("llama-sst", False, *sets), _losses("llama-sst", True, *sets)
    assert compiled == pytest.approx(eager, rel=1e-10, abs=0)


def test_compile_with_activation_checkpointing():
    sets = ("model.gradient_checkpointing=true",)
    eager, compiled = _losses("full", False, *sets), _losses("full", True, *sets)
    assert compiled == pytest.approx(eager, rel=1e-10, abs=0)


def test_compile_with_checkpointing_is_refused_where_it_would_compile_nothing():
    with pytest.raises(ConfigError, match="model.compile: with model.gradient_checkpointing, only method full"):
        load_recipe("recipes/tiny-sst.yaml", ["model.compile=true", "model.gradient_checkpointing=true"])


def test_compile_with_the_materialized_path_and_accumulation():
    eager, compiled = _losses("sst", False, "sst.path=materialized"), _losses("sst", True, "sst.path=materialized")
    assert compiled == pytest.approx(eager, rel=1e-10, abs=0)


@pytest.mark.parametrize("sets", [(), ("model.gradient_checkpointing=true",)])
def test_the_functional_sst_path_compiles_whole_blocks(sets):
    """sst.path=functional is traced with its block: no graph break, and the losses of the eager
    dense path (its gradients are the same formulas), through resamples and re-SVDs."""
    breaks = {}
    compiled = _losses("sst", True, "sst.path=functional", *sets, breaks=breaks)
    assert breaks == {}
    eager_dense = _losses("sst", False, *sets)
    assert compiled == pytest.approx(eager_dense, rel=1e-10, abs=0)
    dense_breaks = {}
    _losses("sst", True, *sets[:0], breaks=dense_breaks)
    assert dense_breaks  # the other paths stay eager: the check above can see a break


def test_the_blocks_share_one_graph():
    """Every decoder block runs one compiled graph: nothing per block (the KV cache's state was)
    makes dynamo recompile, which past its recompile limit (8) would leave the other blocks eager."""
    _losses("full", True)
    assert counters["frames"]["total"] == 1 and counters["stats"]["unique_graphs"] == 1


def test_decoder_blocks_are_the_models_layers():
    model = build_model("tiny")
    assert decoder_blocks(model) == list(model.model.decoder.layers) and len(decoder_blocks(model)) == 2
    with pytest.raises(ConfigError) as err:
        decoder_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert "Sequential" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("method, layers", [("sst", 12), ("llama-sst", 14)])
def test_sst_layers_compiled_alone_follow_the_eager_losses(method, layers):
    """Where blocks cannot be compiled (ZeRO-3), model.compile compiles each functional SST layer's
    computation alone: one graph per weight shape (OPT: q/k/v/out, fc1, fc2; LLaMA: q/k/v/o,
    gate/up, down), shared by the layers, no graph break, and the eager dense path's losses."""
    def compiled_alone(engine, built):
        assert compile_layers(built.layers.values()) == len(built.layers) == layers

    breaks = {}
    compiled = _losses(method, False, "sst.path=functional", breaks=breaks, after_build=compiled_alone)
    assert breaks == {} and counters["stats"]["unique_graphs"] == 3
    assert compiled == pytest.approx(_losses(method, False), rel=1e-10, abs=0)


def test_compile_under_zero3_is_refused_where_no_layer_compiles_alone():
    with pytest.raises(ConfigError, match="compiles only method sst's layers with sst.path=functional"):
        read_ds_config("ds_configs/zero3.json", load_recipe("recipes/tiny-full.yaml", ["model.compile=true"]))
    read_ds_config("ds_configs/zero3.json", load_recipe("recipes/tiny-sst.yaml", ["model.compile=true",
                                                                                 "sst.path=functional"]))
